"""CLT training: schedules, normalisation, checkpoints, metrics, plots, LoRA finetuning and
the training loop (`CLTTrainingRunner`)."""

from clt_forge.training.checkpoint import load_checkpoint, save_checkpoint
from clt_forge.training.runner import CLTTrainingRunner

__all__ = ["CLTTrainingRunner", "load_checkpoint", "save_checkpoint"]
