"""The CLT checkpoint format (version 1): the ONE module its writer and every reader import.

A checkpoint is a folder, written to a temporary sibling and renamed into place (a reader
never sees a half-written one; a crash leaves the previous checkpoint untouched):

    clt.safetensors     W_enc [L, D, F], b_enc [L, F], log_threshold [L, F],
                        W_dec [F, L(L+1)/2, D] (packed source-major: see clt_forge/clt/model.py),
                        b_dec [L, D], norm.in_scale [L], norm.out_scale [L] (float32),
                        and W_skip [L, D, D] for a CLT with a skip connection (clt.skip)
    config.json         {"format", "version", "n_layers", "d_model", "d_features", "bandwidth",
                         "model": {...}, "hooks": {...}, "step", "tokens", "metrics", "train": {...}}
    training_state.pt   optional, for exact resume: step, reader positions, RNG state, ...
    training_state.safetensors
                        with it: Adam moments "exp_avg.NAME" / "exp_avg_sq.NAME" shaped like
                        parameter NAME, and "dead.last_fired" [L, F] (dead-feature counter)

A feature-sharded run (clt_forge/distributed/checkpoint.py) writes one
clt.shard-RRR-of-WWW.safetensors per rank instead of clt.safetensors (rank r's contiguous
feature slice of W_enc, b_enc, log_threshold, W_dec; b_dec, W_skip and norm.* in every shard), likewise
training_state.shard-RRR-of-WWW.safetensors, and lists the slices in config.json's "shards".
`read_tensors` reads any feature range from either layout (only the shards that overlap it), so
`load_checkpoint` gives every consumer the full CLT and a resumed run of any world size reads
just its own slice. `load_features` reads only some features' encoders and decoder rows, from
this format or a foreign one (autointerp: feature_subset.py).

`hooks` ({"mlp_in": [per layer], "mlp_out": [...]}) says where the CLT reads and writes: a run's
model.hook_in / hook_out, which its dataset was cached at (docs/hooks.md).

The CLT works in normalised units: it reads x / in_scale[l] and predicts y / out_scale[l].
`load_checkpoint` needs no training code.

`read_info` / `load_checkpoint` also read other libraries' CLTs as checkpoints, detected from the
folder's files (foreign_*.py, one module per format; docs/formats.md): circuit-tracer's on-disk
CLT (config.yaml with model_kind) and the reference CLT-Forge library's clt_weights.safetensors
(single file or per rank), and `hf://org/name[@revision]` resolves to the downloaded repo first.
Their CheckpointInfo has `format` naming the foreign format, the declared hooks in `hooks`,
what the folder says of the model in `model` ({"hf_name": ...}) and where it came from in
`train["imported"]`; weights come in our layout with the folder's normalisation (1: raw units).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clt_forge.artifacts import foreign_circuit_tracer, foreign_reference
from clt_forge.artifacts.activations import block_relative
from clt_forge.artifacts.feature_subset import FeatureSubset, read_our_features, subset, wanted_by_layer
from clt_forge.artifacts.foreign_common import ForeignHeader
from clt_forge.artifacts.foreign_hub import is_hub, resolve_hub
from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.errors import CLTError

FORMAT = "clt-forge/checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "clt.safetensors"
CONFIG = "config.json"
TRAINING_STATE = "training_state.pt"
WEIGHTS_STEM, STATE_STEM = "clt", "training_state"
ARCHITECTURE_KEYS = ("n_layers", "d_model", "d_features", "bandwidth")


@dataclass
class CheckpointInfo:
    n_layers: int
    d_model: int
    d_features: int
    bandwidth: float
    model: dict[str, Any]  # the language model's config (name, d_model, ...)
    hooks: dict[str, list[str]]
    step: int = 0
    tokens: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # the resolved training config
    format: str = FORMAT
    version: int = FORMAT_VERSION
    shards: dict[str, Any] | None = None  # {"world": W, "files": [...], "slices": [[start, stop], ...]}

    def architecture(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}


def save_checkpoint(
    folder: Path,
    clt: CrossLayerTranscoder | dict[str, torch.Tensor],
    normalization: Normalization,
    info: CheckpointInfo,
    training_state: dict[str, Any] | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint folder atomically (temporary sibling + rename). `clt` is the module or
    its state dict; `state_tensors` go beside `training_state` (Adam moments, dead counters)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_tensors(scratch / WEIGHTS, weight_tensors(clt, normalization))
        (scratch / CONFIG).write_text(json.dumps(info.__dict__, indent=1, default=str))
        if training_state is not None:
            torch.save(training_state, scratch / TRAINING_STATE)
            write_tensors(scratch / f"{STATE_STEM}.safetensors", state_tensors or {})
        install(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return folder


def weight_tensors(
    clt: CrossLayerTranscoder | dict[str, torch.Tensor], normalization: Normalization
) -> dict[str, torch.Tensor]:
    weights = clt.state_dict() if isinstance(clt, torch.nn.Module) else clt
    return {**weights, **normalization.state()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    plain = {
        name: (t.float() if t.is_floating_point() else t).detach().contiguous().cpu() for name, t in tensors.items()
    }
    save_file(plain, path, metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})


def install(scratch: Path, folder: Path) -> None:
    """Move a fully written checkpoint folder into place, replacing an older one of the same
    name never half-way (the old one is renamed aside first, then removed)."""
    if folder.exists():
        retired = folder.with_name(f".{folder.name}-old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(folder, retired)
        os.replace(scratch, folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(scratch, folder)


FOREIGN = (foreign_circuit_tracer, foreign_reference)  # each: detect, read_header, read_weights, read_features


def locate(checkpoint: str | Path) -> Path:
    """The local folder of `checkpoint` (hf://org/name[@rev] is downloaded into the HF cache once)."""
    return resolve_hub(checkpoint) if is_hub(checkpoint) else Path(checkpoint)


def foreign_reader(folder: Path) -> Any | None:
    """The foreign-format module that reads `folder`, or None for ours (config.json with our format;
    a hub repo may carry some other config.json beside a foreign CLT)."""
    if (folder / CONFIG).is_file() and is_ours(folder / CONFIG):
        return None
    return next((reader for reader in FOREIGN if reader.detect(folder)), None)


def is_ours(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def foreign_info(header: ForeignHeader) -> CheckpointInfo:
    return CheckpointInfo(
        n_layers=header.n_layers,
        d_model=header.d_model,
        d_features=header.d_features,
        bandwidth=header.bandwidth,
        model=header.model,
        hooks=header.hooks,
        train={"imported": header.imported},
        format=header.format,
    )


def read_info(folder: str | Path) -> CheckpointInfo:
    folder = locate(folder)
    reader = foreign_reader(folder)
    if reader is not None:
        return foreign_info(reader.read_header(folder))
    path = folder / CONFIG
    if not path.is_file():
        raise CLTError(
            f"no CLT checkpoint at {folder} (no {CONFIG}, no circuit-tracer config.yaml + W_enc_0.safetensors, "
            f"no clt_weights.safetensors): run `clt train` first, or pass checkpoint=PATH or hf://org/name."
        )
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise CLTError(f"{path}: not a clt-forge checkpoint (format={raw.get('format')!r}).")
    if raw.get("version") != FORMAT_VERSION:
        raise CLTError(
            f"{path}: checkpoint format version {raw.get('version')}; this clt-forge reads version {FORMAT_VERSION}."
        )
    return CheckpointInfo(**raw)


def has_skip(folder: str | Path) -> bool:
    """Whether the checkpoint's CLT has a skip connection (W_skip), from tensor headers only."""
    folder = locate(folder)
    reader = foreign_reader(folder)
    if reader is not None:
        return bool(reader.read_header(folder).imported.get("skip"))
    path = weight_files(folder, read_info(folder))[0][0]
    with safe_open(path, "pt") as handle:
        return "W_skip" in handle.keys()  # noqa: SIM118 (a safetensors handle, not a dict)


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[CrossLayerTranscoder, Normalization, CheckpointInfo]:
    """The CLT (normalised units), its normalisation factors and its config."""
    folder = locate(folder)
    reader = foreign_reader(folder)
    if reader is None:
        info = read_info(folder)
        tensors = read_tensors(folder, WEIGHTS_STEM, info, device=device)
    else:
        header = reader.read_header(folder)
        info, tensors = foreign_info(header), reader.read_weights(folder, header, device=device)
    # Built on the meta device and given the read tensors: no second, uninitialised CLT is
    # allocated (on a GPU, torch.empty takes real memory at once).
    clt = CrossLayerTranscoder(
        info.n_layers,
        info.d_model,
        info.d_features,
        bandwidth=info.bandwidth,
        device="meta",
        init=False,
        skip="W_skip" in tensors,
    )
    clt.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("norm.")}, assign=True)
    return clt, Normalization.from_state(tensors), info


def load_features(folder: str | Path, chosen: Sequence[tuple[int, int]]) -> FeatureSubset:
    """The encoders and decoder rows of the (layer, feature) pairs `chosen`, and nothing else of
    the CLT's weights (artifacts/feature_subset.py): the values `load_checkpoint` would give, read
    from any format without loading the CLT."""
    folder = locate(folder)
    reader = foreign_reader(folder)
    if reader is None:
        info = read_info(folder)
        wanted = wanted_by_layer(chosen, info.n_layers)
        tensors = read_our_features(weight_files(folder, info), info.n_layers, info.d_model, wanted)
    else:
        header = reader.read_header(folder)
        wanted = wanted_by_layer(chosen, header.n_layers)
        tensors = reader.read_features(folder, header, wanted)
    return subset(wanted, tensors)


def weight_files(folder: Path, info: CheckpointInfo, stem: str = WEIGHTS_STEM) -> list[tuple[Path, tuple[int, int]]]:
    """Our checkpoint's files of `stem` and the feature slice [start, stop) each holds, each
    checked to exist."""
    if info.shards is None:
        files = [(folder / f"{stem}.safetensors", (0, info.d_features))]
    else:
        world = info.shards["world"]
        files = [(folder / shard_file(stem, r, world), tuple(info.shards["slices"][r])) for r in range(world)]
    for path, _ in files:
        if not path.is_file():
            raise CLTError(f"checkpoint {folder}: {path.name} is missing (listed in its {CONFIG}).")
    return [(path, (int(held[0]), int(held[1]))) for path, held in files]


SHARDED_KEYS = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 0, "dead.last_fired": 1}  # -> feature dim


def feature_dim(key: str) -> int | None:
    """The feature dimension of a checkpoint tensor (None: replicated, the same on every shard)."""
    for prefix in ("exp_avg.", "exp_avg_sq."):
        key = key.removeprefix(prefix)
    return SHARDED_KEYS.get(key)


def shard_file(stem: str, rank: int, world: int) -> str:
    return f"{stem}.shard-{rank:03d}-of-{world:03d}.safetensors"


def read_tensors(
    folder: Path, stem: str, info: CheckpointInfo, features: slice | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of `stem` (clt or training_state) for global features `features` of every layer
    (all by default), from a plain or a sharded checkpoint; only overlapping shards are read."""
    files = [(path, slice(*held)) for path, held in weight_files(folder, info, stem)]
    want = features or slice(0, info.d_features)
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor]] = {}
    for path, held in files:
        lo, hi = max(held.start, want.start), min(held.stop, want.stop)
        with safe_open(path, "pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                dim = feature_dim(key)
                if dim is None:
                    if key not in out:
                        out[key] = handle.get_tensor(key)
                elif lo < hi:
                    index = (slice(None),) * dim + (slice(lo - held.start, hi - held.start),)
                    parts.setdefault(key, []).append(handle.get_slice(key)[index])
    for key, pieces in parts.items():  # one piece: used as read (cat would copy it), strided slices made contiguous
        out[key] = pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=feature_dim(key) or 0)
    if "W_enc" in out and out["W_enc"].shape[2] != want.stop - want.start:
        raise CLTError(
            f"checkpoint {folder}: its shards hold {out['W_enc'].shape[2]} of features {want.start}..{want.stop - 1}."
        )
    return out


def check_model_matches(
    info: CheckpointInfo, source: Path | str, model_cfg: Any, hooks: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Refuse a checkpoint made for another model, or fed at other hook points, naming both sides.

    The model: d_model, n_layers, and its name where the checkpoint records one (ours: the config
    name; an imported CLT: the hub name, compared with the config's hf_name). The hooks: `hooks` (per-layer names of what
    will feed the CLT, e.g. a dataset manifest's) or else the model config's `hook_in` / `hook_out`
    where it declares them (block-relative, e.g. hook_resid_mid; null: not declared), against the
    CLT's declared hooks."""
    wanted: dict[str, Any] = {"d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers}
    found: dict[str, Any] = {"d_model": info.d_model, "n_layers": info.n_layers}
    if info.model.get("name"):
        wanted["name"], found["name"] = model_cfg.name, info.model["name"]
    elif info.model.get("hf_name") and getattr(model_cfg, "hf_name", None):  # an imported CLT naming its model
        wanted["hf_name"], found["hf_name"] = model_cfg.hf_name, info.model["hf_name"]
    diffs = [f"{k}: checkpoint {found[k]!r}, config {wanted[k]!r}" for k in wanted if found[k] != wanted[k]]
    if diffs:
        raise CLTError(f"checkpoint {source} was trained for another model ({'; '.join(diffs)}).")
    if not info.hooks:
        return
    declared = {"mlp_in": getattr(model_cfg, "hook_in", None), "mlp_out": getattr(model_cfg, "hook_out", None)}
    for kind, key in (("mlp_in", "hook_in"), ("mlp_out", "hook_out")):
        fed = per_layer_hooks(hooks.get(kind) if hooks is not None else declared[kind], info.n_layers)
        if fed is not None and list(fed) != list(info.hooks[kind]):
            if hooks is not None:
                side = f"the activations fed to it use {fed[0]} ..."
            else:
                side = (
                    f"model {model_cfg.name} declares {fed[0]} ... (model.{key}); pass "
                    f"model.{key}={block_relative(info.hooks)[kind == 'mlp_out']} or a model config declaring it"
                )
            raise CLTError(
                f"checkpoint {source} reads / writes {kind} at {info.hooks[kind][0]} ... (its declared hooks); "
                f"{side}: the CLT would see other activations than it was trained on."
            )


def per_layer_hooks(value: str | Sequence[str] | None, n_layers: int) -> list[str] | None:
    """Per-layer hook names from a block-relative name (`hook_resid_mid` -> blocks.{l}.hook_resid_mid)."""
    if value is None or isinstance(value, str):
        return None if value is None else [f"blocks.{layer}.{value}" for layer in range(n_layers)]
    return list(value)
