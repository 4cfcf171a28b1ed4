"""CLT training: schedules, metrics, plots, LoRA finetuning and the training loop
(`CLTTrainingRunner`). The checkpoint format it writes lives in `clt_forge.artifacts.checkpoint`."""

from clt_forge.artifacts.checkpoint import load_checkpoint, save_checkpoint
from clt_forge.training.runner import CLTTrainingRunner

__all__ = ["CLTTrainingRunner", "load_checkpoint", "save_checkpoint"]
