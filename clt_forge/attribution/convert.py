"""Turn a clt-forge checkpoint into circuit-tracer's `CrossLayerTranscoder`, in memory or on disk.

Our CLT works in normalised units: it reads x / in_scale[l] and predicts y / out_scale[t]
(clt_forge.artifacts.normalization). The scales are per-layer scalars, so they fold exactly
into the weights and the converted transcoder maps raw MLP inputs to raw MLP outputs:

    W_enc'[l] = (W_enc[l] / in_scale[l])^T          [F, D]  (circuit-tracer stores [L, F, D])
    b_enc'[l] = b_enc[l],  threshold'[l] = exp(log_threshold[l])
    W_dec'[l][:, t - l] = W_dec[l -> t] * out_scale[t]   [F, L - l, D]
    b_dec'[t] = b_dec[t] * out_scale[t]
    W_skip'[l] = W_skip[l] * out_scale[l] / in_scale[l]   [D, D]  (a CLT with clt.skip; inputs @ W_skip'[l])

JumpReLU is z = h * (h > threshold) in both libraries, so features agree exactly too.

A TopK or BatchTopK CLT (clt.activation, clt_forge/clt/activations.py) exports the same way, as
a JumpReLU CLT: its log_threshold holds no learned gradient but the inference threshold its
training forwards estimated (per layer, a moving average of the smallest activation kept), which
is what the BatchTopK paper uses at inference. The export then keeps, per token, the features
above that threshold instead of exactly the top k: tests/test_activations.py checks that the
exported CLT, read back by circuit-tracer's load_clt, explains the held-out variance the trained
one does to within 0.05 for BatchTopK, whose batch cutoff is what the threshold estimates, and
0.15 for TopK, whose cutoff varies per token (EXPORT_EV_TOLERANCE), at about the same L0. Checkpoints record no
activation: `load_checkpoint` gives this JumpReLU CLT, the one attribution uses.

On disk (`export_circuit_tracer`) we write what circuit-tracer's `load_clt` reads back:
W_enc_{l}.safetensors (W_enc_{l}, b_enc_{l}, b_dec_{l}, threshold_{l}) and
W_dec_{l}.safetensors (W_dec_{l}), plus the config.yaml its hub loader expects
(model_kind: cross_layer_transcoder and the hook names). A CLT with a skip connection also gets
W_skip_{l}.safetensors (W_skip_{l} [D, D]). circuit-tracer 0.5's `load_clt` does not read them
(its on-disk CLT has no skip): `to_circuit_tracer(folder)` loads such a folder with the skip
attached, and clt-forge's own readers (foreign_circuit_tracer.py) read it back whole.

Hooks: a checkpoint of ours reads `mlp.hook_in` and writes `mlp.hook_out`; an imported one
(circuit-tracer's format, CLT-Forge's: clt_forge/artifacts/foreign_*.py) keeps the hooks it
declares (e.g. `hook_resid_mid`), read from CheckpointInfo.hooks, so attribution and export
hook the points the CLT was trained on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTTranscoder
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from safetensors.torch import save_file

from clt_forge.artifacts import foreign_circuit_tracer
from clt_forge.artifacts.checkpoint import CheckpointInfo, foreign_info, foreign_reader, load_checkpoint, locate
from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.model import CrossLayerTranscoder

__all__ = [
    "FEATURE_INPUT_HOOK",
    "FEATURE_OUTPUT_HOOK",
    "FoldedWeights",
    "export_circuit_tracer",
    "fold",
    "to_circuit_tracer",
]

# Block-relative hook names of the replacement model: exactly what `clt cache` stored
# (clt_forge.models.activations: the MLP module's input and output).
FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"


def declared_hooks(info: CheckpointInfo | None) -> tuple[str, str]:
    """(feature_input_hook, feature_output_hook), block-relative, from the checkpoint's per-layer hooks."""
    if info is None or not info.hooks:
        return FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK
    found = []
    for kind in ("mlp_in", "mlp_out"):
        names = {name.split(".", 2)[2] if name.startswith("blocks.") else name for name in info.hooks[kind]}
        if len(names) != 1:
            raise ValueError(
                f"checkpoint hooks {kind} differ between layers ({sorted(names)}): circuit-tracer needs one."
            )
        found.append(names.pop())
    return found[0], found[1]


@dataclass
class FoldedWeights:
    """circuit-tracer's parameter layout, in raw model units (float32, CPU)."""

    W_enc: torch.Tensor  # [L, F, D]
    b_enc: torch.Tensor  # [L, F]
    threshold: torch.Tensor  # [L, F]
    W_dec: list[torch.Tensor]  # W_dec[l]: [F, L - l, D]
    b_dec: torch.Tensor  # [L, D]
    W_skip: torch.Tensor | None = None  # [L, D, D], raw units: y_l += x_l @ W_skip[l]


@torch.no_grad()
def fold(clt: CrossLayerTranscoder, norm: Normalization, in_place: bool = False) -> FoldedWeights:
    """Fold the normalisation into the weights (see the module docstring). `in_place` spends `clt`
    (for one loaded just for this): W_dec is scaled where it lies and handed out as per-source
    views [F, L - l, D] of it, W_enc is dropped once transposed, so folding adds W_enc's size,
    not the CLT's."""
    if in_place:
        return fold_in_place(clt, norm)
    in_scale = norm.in_scale.to(clt.W_enc.device, torch.float32)
    out_scale = norm.out_scale.to(clt.W_enc.device, torch.float32)
    W_enc = (clt.W_enc.float() / in_scale[:, None, None]).transpose(1, 2).contiguous()
    W_dec = [(clt.decoder(source).float() * out_scale[source:, None]).contiguous() for source in range(clt.n_layers)]
    return FoldedWeights(
        W_enc=W_enc.cpu(),
        b_enc=clt.b_enc.float().cpu().clone(),
        threshold=clt.jumprelu_threshold().float().cpu(),
        W_dec=[w.cpu() for w in W_dec],
        b_dec=(clt.b_dec.float() * out_scale[:, None]).cpu(),
        W_skip=_fold_skip(clt, in_scale, out_scale),
    )


@torch.no_grad()
def fold_in_place(clt: CrossLayerTranscoder, norm: Normalization) -> FoldedWeights:
    in_scale = norm.in_scale.to(clt.W_enc.device, torch.float32)
    out_scale = norm.out_scale.to(clt.W_enc.device, torch.float32)
    W_enc = clt.W_enc.new_empty(clt.n_layers, clt.d_features, clt.d_model)
    for layer in range(clt.n_layers):  # one layer's transpose at a time
        W_enc[layer].copy_(clt.W_enc[layer].t()).div_(in_scale[layer])
    clt.register_parameter("W_enc", None)
    packed = clt.W_dec.detach()
    targets = torch.triu_indices(clt.n_layers, clt.n_layers)[1].to(packed.device)  # each pair's target, packed order
    packed.mul_(out_scale[targets][None, :, None])
    return FoldedWeights(
        W_enc=W_enc.cpu(),
        b_enc=clt.b_enc.detach().float().cpu().clone(),
        threshold=clt.jumprelu_threshold().detach().float().cpu(),
        W_dec=[clt.decoder(source).detach().cpu() for source in range(clt.n_layers)],
        b_dec=(clt.b_dec.detach().float() * out_scale[:, None]).cpu(),
        W_skip=_fold_skip(clt, in_scale, out_scale),
    )


def _fold_skip(clt: CrossLayerTranscoder, in_scale: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor | None:
    if clt.W_skip is None:
        return None
    return (clt.W_skip.detach().float() * (out_scale / in_scale)[:, None, None]).cpu()


@torch.no_grad()
def to_circuit_tracer(
    checkpoint: str | Path | tuple[CrossLayerTranscoder, Normalization],
    scan: str = "clt-forge",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CTTranscoder:
    """circuit-tracer's CrossLayerTranscoder with every weight in memory (lazy_decoder=False),
    reading `blocks.{l}.mlp.hook_in` and writing `blocks.{l}.mlp.hook_out` in raw units (an
    imported checkpoint: the hooks it declares).

    A checkpoint folder is loaded and folded in place (memory: the CLT plus its W_enc once more,
    not twice the CLT); a circuit-tracer folder (foreign_circuit_tracer) is handed to circuit-tracer's
    own load_clt with lazy_decoder=True, its default for published CLTs: the encoders are held,
    decoder rows are read from W_dec_{l}.safetensors when attribution needs them."""
    folder = None if isinstance(checkpoint, tuple) else locate(checkpoint)
    if folder is not None and foreign_reader(folder) is foreign_circuit_tracer:
        header = foreign_circuit_tracer.read_header(folder)  # refuses what load_checkpoint refuses
        input_hook, output_hook = declared_hooks(foreign_info(header))
        loaded = load_clt(str(folder), input_hook, output_hook, scan, torch.device(device), dtype, lazy_decoder=True)
        skip = foreign_circuit_tracer.read_skip(folder, header)
        if skip is not None:  # load_clt reads no skip connection from disk
            loaded.W_skip = torch.nn.Parameter(skip.to(device=device, dtype=dtype), requires_grad=False)
            loaded.skip_connection = True
        return loaded
    clt, norm, info = _load(checkpoint)
    input_hook, output_hook = declared_hooks(info)
    weights = fold(clt, norm, in_place=folder is not None)
    # On the meta device, named: its constructor zero-fills on the default device (CPU) when given
    # none, whatever the torch.device context says. The folded tensors are assigned below.
    converted = CTTranscoder(
        clt.n_layers,
        clt.d_features,
        clt.d_model,
        activation_function="jump_relu",
        skip_connection=weights.W_skip is not None,
        lazy_decoder=False,
        lazy_encoder=False,
        feature_input_hook=input_hook,
        feature_output_hook=output_hook,
        scan=scan,
        device=torch.device("meta"),
        dtype=torch.float32,
    )
    state = {
        "W_enc": weights.W_enc,
        "b_enc": weights.b_enc,
        "b_dec": weights.b_dec,
        "activation_function.threshold": weights.threshold[:, None, :].contiguous(),
        **{f"W_dec.{source}": decoder for source, decoder in enumerate(weights.W_dec)},
        **({} if weights.W_skip is None else {"W_skip": weights.W_skip}),
    }
    converted.load_state_dict(state, assign=True)
    return converted.to(device=torch.device(device), dtype=dtype)


def export_circuit_tracer(checkpoint: str | Path | tuple[CrossLayerTranscoder, Normalization], out: str | Path) -> Path:
    """Write circuit-tracer's on-disk CLT format (see the module docstring) atomically to `out`."""
    clt, norm, info = _load(checkpoint)
    input_hook, output_hook = declared_hooks(info)
    weights = fold(clt, norm, in_place=not isinstance(checkpoint, tuple))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export folder {out} is not empty; choose another export= path or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for layer in range(clt.n_layers):
            encoder = {
                f"W_enc_{layer}": weights.W_enc[layer].contiguous(),
                f"b_enc_{layer}": weights.b_enc[layer].contiguous(),
                f"b_dec_{layer}": weights.b_dec[layer].contiguous(),
                f"threshold_{layer}": weights.threshold[layer].contiguous(),
            }
            save_file(encoder, scratch / f"W_enc_{layer}.safetensors")
            decoder = weights.W_dec[layer].contiguous()  # a view of the packed W_dec when folded in place
            save_file({f"W_dec_{layer}": decoder}, scratch / f"W_dec_{layer}.safetensors")
            if weights.W_skip is not None:
                save_file(
                    {f"W_skip_{layer}": weights.W_skip[layer].contiguous()}, scratch / f"W_skip_{layer}.safetensors"
                )
        (scratch / "config.yaml").write_text(
            "model_kind: cross_layer_transcoder\n"
            f"feature_input_hook: {input_hook}\n"
            f"feature_output_hook: {output_hook}\n"
            + (f"model_name: {info.model['hf_name']}\n" if info and info.model.get("hf_name") else "")
        )
        if out.exists():
            out.rmdir()
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out


def _load(
    checkpoint: str | Path | tuple[CrossLayerTranscoder, Normalization],
) -> tuple[CrossLayerTranscoder, Normalization, CheckpointInfo | None]:
    if isinstance(checkpoint, tuple):
        return (*checkpoint, None)
    return load_checkpoint(checkpoint)
