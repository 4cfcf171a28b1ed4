"""QuantSpec: how an activation dataset is quantized; the `quant` config group's schema and the
record every dataset manifest keeps (its fields, in this order, are the manifest's `quant`).

Light on purpose (no torch): the config schema imports it. The codecs are in quantizers.py; the
byte format is documented in quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from clt_forge.registry import CHOICES

STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # scheme none: the dtype values are stored in


class ScaleGranularity(StrEnum):
    layer = "layer"  # one absmax scale per layer per chunk (the paper)
    row = "row"  # one scale per token per layer
    group = "group"  # one scale per `group_size` channels per token per layer


class ScaleRule(StrEnum):
    absmax = "absmax"  # scale = absmax / qmax: no value clips
    mse = "mse"  # absmax, then least-squares refinement (row/group): far better at int2/int4


@dataclass
class QuantSpec:
    """How activations are stored on disk. `scheme` names a registered quantizer (QUANTIZERS in
    quantizers.py), which reads the settings it uses and checks them (`Quantizer.check`)."""

    scheme: str = "int8"  # a registered quantizer (clt_forge/artifacts/quantizers.py)
    granularity: ScaleGranularity = ScaleGranularity.row  # int schemes: what one absmax scale covers
    group_size: int = 64  # int schemes: channels per scale when granularity=group
    outlier_fraction: float = 0.0  # int schemes: share of values per chunk stored exactly beside the codes
    dtype: str = "float16"  # scheme none: storage dtype (float32, float16, bfloat16)
    zstd_level: int = 1  # 0 disables zstd; 1 by measurement: level 3 saves <0.1% of the bytes for ~30% more time
    zstd_threads: int = 0  # 0: single-threaded; -1: all cores
    predict: bool = False  # int schemes: code each layer's residual after predicting it from the decoded previous layer
    scale_rule: ScaleRule = ScaleRule.absmax  # int schemes: how row/group scales are chosen

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"quant.dtype={self.dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        if not -7 <= self.zstd_level <= 22:
            raise ValueError(f"quant.zstd_level={self.zstd_level!r}: expected 0 (off) or a zstd level in -7..22")
        quantizers = CHOICES.get("quant.scheme")
        if quantizers is not None:  # loaded with the codecs (clt_forge.artifacts.quantizers)
            if self.scheme not in quantizers:
                raise ValueError(f"quant.scheme={self.scheme!r}: {quantizers.message(self.scheme)}")
            quantizers[self.scheme].check(self)
