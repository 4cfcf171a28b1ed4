"""What a training run needs before its first step: the recorded run config, the data
(training batches and a fixed held-out set), the normalisation and this rank's CLT."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.activations import HELD_OUT, atomic_write, block_relative, check_dataset_hooks, read_manifest
from clt_forge.artifacts.checkpoint import check_model_matches, has_skip, load_checkpoint, read_info
from clt_forge.artifacts.normalization import Normalization
from clt_forge.artifacts.reader import check_compatible
from clt_forge.clt import CrossLayerTranscoder, init_clt
from clt_forge.clt.deferred import DeferredDecoderGrad, enable_deferred_decoder
from clt_forge.clt.lazy_adam import enable_row_lazy_adam
from clt_forge.config.plain import plain
from clt_forge.config.schema import ON_THE_FLY, Precision, ShardingMode, TrainConfig
from clt_forge.data.store import ActivationsStore
from clt_forge.distributed.parallel import Parallel
from clt_forge.errors import CLTError

RUN_CONFIG = "train_config.json"


@dataclasses.dataclass
class HeldOut:
    """The fixed evaluation batch (raw units) and where it came from."""

    x: torch.Tensor  # [eval_tokens, n_layers, d_model]
    y: torch.Tensor  # [eval_tokens, n_layers, d_model]
    source: str


def read_run_config(run: Path) -> dict[str, Any]:
    """The resolved config a `clt train` run recorded (what resume= continues with)."""
    path = run / RUN_CONFIG
    if not path.is_file():
        raise CLTError(f"resume={run}: no {RUN_CONFIG} there; is it a `clt train` run folder?")
    return json.loads(path.read_text())


def write_run_config(cfg: TrainConfig, run: Path) -> None:
    """Record the resolved config, atomically: under torchrun the other ranks read it (resume=)
    while rank 0 writes it, and a plain write shows them an empty file for a moment."""
    atomic_write(run / RUN_CONFIG, json.dumps(plain(cfg), indent=1).encode())


def resolve_finetune(cfg: TrainConfig) -> None:
    """A finetune trains its checkpoint's CLT, whatever clt.d_features / clt.jumprelu_bandwidth /
    clt.skip say: put the checkpoint's width, STE bandwidth and skip connection into `cfg`, so the
    run config, the logger's config and each checkpoint's `train` record what was trained."""
    if cfg.finetune.source:
        info = read_info(cfg.finetune.source)
        cfg.clt.d_features, cfg.clt.jumprelu_bandwidth = info.d_features, info.bandwidth
        cfg.clt.skip = has_skip(cfg.finetune.source)


def check_resume(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a run with another architecture, naming what changed."""
    before = read_run_config(out)
    now = plain(cfg)
    keys = [("clt", k) for k in now["clt"]] + [("model", "name"), ("model", "d_model"), ("model", "n_layers")]
    # a key the recorded run lacks did not exist when it was written: not counted as a change
    diffs = [
        f"{a}.{b}: {before[a].get(b)!r} -> {now[a][b]!r}" for a, b in keys if before[a].get(b, now[a][b]) != now[a][b]
    ]
    if diffs:
        raise CLTError(
            f"resume={out}: the architecture changed ({'; '.join(diffs)}); resume with the original settings."
        )


def run_hooks(cfg: TrainConfig) -> tuple[tuple[str, str], str]:
    """The block-relative (input, output) hooks the CLT of this run reads and writes, and whose
    they are. A finetune: those its checkpoint declares, checked against the model config (shape,
    name, and hooks where the config declares them); a config declaring none adopts the
    checkpoint's, so the run's checkpoints record them. Else the model config's (docs/hooks.md)."""
    from clt_forge.models.activations import configured_hooks

    if cfg.finetune.source:
        info = read_info(cfg.finetune.source)
        check_model_matches(info, cfg.finetune.source, cfg.model)
        hooks = block_relative(info.hooks)
        if configured_hooks(cfg.model) != hooks:  # the model config declares none
            cfg.model.hook_in, cfg.model.hook_out = hooks
        return hooks, f"finetune.from={cfg.finetune.source}"
    return configured_hooks(cfg.model), f"model.hook_in / model.hook_out of model {cfg.model.name}"


def training_data(cfg: TrainConfig, parallel: Parallel) -> tuple[ActivationsStore, HeldOut]:
    """The training batches (this rank's share) and a fixed held-out evaluation set, read at the
    CLT's hooks (a dataset cached at others is refused before anything is read)."""
    hooks, whose = run_hooks(cfg)
    if parallel.world > 1 and (cfg.data.source == ON_THE_FLY or not cfg.activations):
        raise CLTError(
            f"sharding={parallel.mode.value} on {parallel.world} ranks trains from a cached dataset: "
            "pass activations=PATH (write one with `clt cache`)."
        )
    if cfg.data.source == ON_THE_FLY or not cfg.activations:
        if not cfg.activations:
            print("note: no activations=PATH given; running the model on the fly (data.source=model).")
        from clt_forge.models import load_model
        from clt_forge.models.activations import use_hooks

        model = use_hooks(load_model(cfg.model), hooks)  # the store reads the model where it says
        text = dataclasses.replace(cfg.data, source="files" if cfg.data.path else "bundled")
        store = ActivationsStore.from_model(
            model, text, cfg.batch_size, seed=cfg.seed, windows_per_forward=cfg.windows_per_forward
        )
        held = ActivationsStore.from_model(
            model, text, cfg.eval_tokens, split="held_out", seed=cfg.seed, windows_per_forward=cfg.windows_per_forward
        )
        batch = next(iter(held))
        return store, HeldOut(batch.mlp_in, batch.mlp_out, "held-out documents (on the fly)")
    folder = Path(cfg.activations)
    manifest = read_manifest(folder)
    check_compatible(manifest, folder, model=cfg.model.name, n_layers=cfg.model.n_layers, d_model=cfg.model.d_model)
    check_dataset_hooks(manifest, folder, hooks, whose, cfg.model.name)
    store = ActivationsStore.from_cache(
        folder,
        parallel.local_batch_size(cfg.batch_size),
        seed=cfg.seed,
        rank=parallel.data_rank,
        world_size=parallel.data_world,
        shuffle_chunks=cfg.reader.shuffle_chunks,
        prefetch_groups=cfg.reader.prefetch_groups,
        workers=cfg.reader.workers,
        skip_corrupt=cfg.reader.skip_corrupt,
    )
    if (folder / HELD_OUT / "manifest.json").is_file():
        held_manifest = read_manifest(folder / HELD_OUT)
        n = min(cfg.eval_tokens, held_manifest.n_tokens)
        held = ActivationsStore.from_cache(folder / HELD_OUT, n, seed=cfg.seed, skip_corrupt=cfg.reader.skip_corrupt)
        batch = next(iter(held))
        return store, HeldOut(batch.mlp_in, batch.mlp_out, str(folder / HELD_OUT))
    print(f"note: {folder} has no held_out/ dataset; evaluating on a fixed batch of training tokens.")
    fixed = ActivationsStore.from_cache(
        folder, cfg.eval_tokens, seed=cfg.seed + 1, skip_corrupt=cfg.reader.skip_corrupt
    )
    batch = next(iter(fixed))
    return store, HeldOut(batch.mlp_in, batch.mlp_out, "training tokens (no held-out dataset)")


def normalization(cfg: TrainConfig, parallel: Parallel, store: ActivationsStore) -> Normalization:
    """The dataset's normalisation (`normalization=`), with `layer_weights` folded into the
    output scales: out_scale[l] / sqrt(w_l) weighs layer l's squared error by w_l in the loss
    while the CLT's outputs in model units stay what they were (the checkpoint stores the scales)."""
    weights = dict(enumerate(cfg.layer_weights))
    return dataset_normalization(cfg, parallel, store).with_layer_weights(weights, "layer_weights")


def dataset_normalization(cfg: TrainConfig, parallel: Parallel, store: ActivationsStore) -> Normalization:
    """From the dataset's statistics, else estimated from the first `norm_batches` batches.

    Estimating reads those batches ahead of training, which starts again at the reader's start
    position; the reader's recorded position is put back so a checkpoint records only what
    training consumed (else resume would skip `norm_batches` batches the first run trained on)."""
    missing = "no normalisation statistics"
    if store.reader is not None and store.reader.manifest.stats:
        try:
            return Normalization.from_manifest(store.reader.manifest, cfg.normalization)
        except CLTError as err:
            missing = str(err)
    if parallel.world > 1:
        raise CLTError(
            f"{cfg.activations}: {missing}, needed for normalization={cfg.normalization} on >1 rank; "
            "re-cache it, or use normalization=rms."
        )
    batches = iter(store)
    estimated = Normalization.estimate((next(batches) for _ in range(cfg.norm_batches)), cfg.normalization)
    if store.reader is not None:
        store.reader.tokens_served = store.reader.start_tokens
    return estimated


def build_clt(
    cfg: TrainConfig, parallel: Parallel, features: slice, d_features: int
) -> tuple[CrossLayerTranscoder, Normalization | None]:
    """This rank's CLT (all features, or its slice under feature sharding), seeded init; for
    `finetune.from`, the pretrained CLT with LoRA adapters and the normalisation it was trained with."""
    device = parallel.device
    if cfg.finetune.source:
        from clt_forge.training.lora import add_lora

        if parallel.world > 1:
            raise CLTError("finetune.from runs in one process (sharding=single); LoRA adapters are small.")
        clt, pretrained_normalization, _ = load_checkpoint(cfg.finetune.source, device=device)
        add_lora(clt, cfg.finetune.rank)
        return clt, pretrained_normalization
    clt = CrossLayerTranscoder(
        cfg.model.n_layers,
        cfg.model.d_model,
        features.stop - features.start,
        bandwidth=cfg.clt.jumprelu_bandwidth,
        device=device,
        init=False,
        activation=cfg.clt.activation,
        k=cfg.clt.k,
        decode=cfg.clt.decode,
        native_kernel=cfg.clt.native_kernel,
        skip=cfg.clt.skip,
    )
    init_clt(
        clt,
        cfg.clt.jumprelu_threshold,
        seed=cfg.seed,
        features=features,
        d_features=d_features,
        encoder=cfg.clt.init_encoder,
    )
    return clt, None


def decoder_grad_sink(
    cfg: TrainConfig, parallel: Parallel, clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer
) -> DeferredDecoderGrad | None:
    """`optim.decoder_grad=blocks`: route W_dec's gradient to a `DeferredDecoderGrad`, `rows` to a
    `RowLazyAdam` (the runner calls its `adam_step` after each optimizer step); refused where a
    full gradient is needed."""
    if cfg.optim.decoder_grad == "full":
        return None
    needs_full = {
        "sharding=ddp / fsdp (they reduce W_dec.grad across ranks)": parallel.mode
        in (ShardingMode.ddp, ShardingMode.fsdp),
        "precision=fp16 (its loss scaler checks W_dec.grad for overflow)": cfg.precision is Precision.fp16,
        "finetune.from (its LoRA adapters take W_dec's gradient)": bool(cfg.finetune.source),
    }
    for reason, applies in needs_full.items():
        if applies:
            raise CLTError(
                f"optim.decoder_grad={cfg.optim.decoder_grad} does not work with {reason}; use optim.decoder_grad=full."
            )
    if cfg.optim.decoder_grad == "rows":
        return enable_row_lazy_adam(clt, optimizer, reads_all_rows=cfg.sparsity.dead_coefficient != 0)
    return enable_deferred_decoder(clt, exp_avg_dtype=getattr(torch, cfg.optim.exp_avg_dtype))
