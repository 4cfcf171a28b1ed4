"""The cross-layer transcoder: model, JumpReLU, loss and initialisation (single device, plain PyTorch)."""

from clt_forge.clt.init import init_clt, init_encoder_bias
from clt_forge.clt.jumprelu import jumprelu, step
from clt_forge.clt.loss import LossTerms, clt_loss, layer_metrics
from clt_forge.clt.model import CLTOutput, CrossLayerTranscoder, pair_offsets

__all__ = [
    "CLTOutput",
    "CrossLayerTranscoder",
    "LossTerms",
    "clt_loss",
    "init_clt",
    "init_encoder_bias",
    "jumprelu",
    "layer_metrics",
    "pair_offsets",
    "step",
]
