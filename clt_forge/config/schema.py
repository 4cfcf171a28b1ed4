"""Typed structured configs: the one schema every YAML file under conf/ is validated against.

Each config group (model, data, quant, sharding, sparsity, clt, logger) has a dataclass here
or beside the registry it selects from (QuantSpec: clt_forge/artifacts/quant_spec.py, the sparsity
schedules: schedules.py); each stage (cache, train, autointerp, attribute, serve) has a primary
dataclass that holds the groups it uses plus its own section. A choice users extend (quantizer,
schedule, model source, explainer) is a plain string naming an entry of its registry
(clt_forge/registry.py; compose.validate checks it and lists the allowed values); a fixed choice
(precision, sharding mode, ...) is an Enum, so a wrong value fails at start-up with the allowed
values listed either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from clt_forge.artifacts.quant_spec import QuantSpec
from clt_forge.config.schedules import SparsityConfig
from clt_forge.errors import ConfigError


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


ON_THE_FLY = "model"  # data.source for `clt train` only: activations from the model as it runs


class ShardingMode(StrEnum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    feature = "feature"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast (CPU or GPU)
    fp16 = "fp16"  # autocast with a gradient scaler (GPU)


class NormalizationMethod(StrEnum):  # clt_forge/artifacts/normalization.py
    mean_norm = "mean_norm"  # the paper's: sqrt(d) / E||x||
    rms = "rms"  # sqrt(d / E||x||^2)
    mixed = "mixed"  # inputs by mean_norm, outputs by rms


class LoggerKind(StrEnum):
    none = "none"
    wandb = "wandb"


class EncodeMode(StrEnum):
    auto = "auto"  # inline when the model runs on the CPU, background on a GPU
    background = "background"  # a thread encodes chunk n while the model runs chunk n+1 (GPU: CPU is idle)
    inline = "inline"  # encode between forwards with every thread (CPU-only: no thread contention)


class Offload(StrEnum):
    cpu = "cpu"
    disk = "disk"


@dataclass
class ModelConfig:
    """How to load a language model and where its MLPs are."""

    name: str = MISSING  # the config's own name, recorded in every artifact
    source: str = "gguf"  # which registered loader builds it (clt_forge/models)
    hf_name: str | None = None  # hub / TransformerLens name (transformer_lens source)
    gguf_package: str | None = None  # importable package holding the GGUF (gguf source)
    gguf_file: str | None = None  # file name inside that package
    converted_dir: str | None = None  # where the GGUF is converted once (default: user cache)
    n_layers: int = MISSING  # checked against the loaded model
    d_model: int = MISSING  # residual width: the CLT's input and output size
    d_mlp: int = MISSING  # MLP hidden width (checked against the loaded model)
    n_heads: int = 0  # source=tiny builds with these; others record them
    n_key_value_heads: int = 0  # grouped-query attention heads (0: same as n_heads)
    d_vocab: int = 0  # vocabulary size
    rope_theta: float = 10000.0  # rotary base (source=tiny)
    n_ctx: int = 2048  # longest sequence supported (TransformerLens keeps an n_ctx^2 mask per layer)
    dtype: DType = DType.float32  # dtype the model runs in
    device: str = "cpu"  # torch device of the model (cpu, cuda, cuda:1)
    seed: int = 0  # only for source=tiny
    # Where a CLT of this model reads and writes, block-relative like circuit-tracer's
    # feature_input_hook / feature_output_hook (docs/hooks.md): `clt cache` stores these, `clt train`
    # records them, and a CLT declaring others is refused. null: not declared (the MLP's own
    # input / output, mlp.hook_in / mlp.hook_out, and any CLT's declared hooks are accepted).
    hook_in: str | None = None  # block-relative hook a CLT reads, e.g. hook_resid_mid; null: mlp.hook_in
    hook_out: str | None = None  # block-relative hook a CLT writes, e.g. hook_mlp_out; null: mlp.hook_out


@dataclass
class DataConfig:
    """Which text, and how it becomes fixed context windows."""

    name: str = MISSING  # the config's own name, recorded in every artifact
    source: str = "bundled"  # a registered text source (clt_forge/data/text.py), or model (train: on the fly)
    path: str | None = None  # HF dataset name (hf) or a file / glob / folder (files)
    hf_config: str | None = None  # HF dataset configuration name
    split: str = "train"  # HF dataset split to read
    text_column: str = "text"  # column holding the text (hf, json, parquet)
    context_size: int = 128  # tokens per window, BOS included
    prepend_bos: bool = True  # every window starts with BOS (never stored or modelled)
    held_out_fraction: float = 0.02  # documents held out, chosen by a hash of their text
    seed: int = 0  # order of documents within a split
    max_documents: int | None = None  # read only the first N documents (by id)


@dataclass
class ShardingConfig:
    mode: ShardingMode = ShardingMode.single  # how `clt train` spreads over torchrun ranks
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass
class CLTConfig:
    """Architecture of the cross-layer transcoder."""

    d_features: int | None = None  # features per layer; None: expansion_factor * d_model
    expansion_factor: float = 2.0  # d_features = expansion_factor * d_model when d_features is null
    jumprelu_threshold: float = 0.03  # initial threshold (normalised units)
    jumprelu_bandwidth: float = 0.05  # width of the rectangle kernel of the STE (docs/quality.md: 1.0 before, same EV)
    init_l0: float = 64.0  # target L0 per layer after encoder-bias init
    init_encoder: str = (
        "uniform"  # uniform, or decoder: each encoder column starts along its same-layer decoder (clt/init.py)
    )
    activation: str = "jumprelu"  # a registered activation function (clt_forge/clt/activations.py)
    k: int = 0  # topk: features kept per layer per token; batchtopk: k x batch per layer
    decode: str = "auto"  # auto, dense or sparse: how the decoder runs (clt/sparse_decode.py)
    native_kernel: str = "auto"  # sparse CPU decode's C kernels: auto (where they build), on, off (clt/native.py)
    skip: bool = False  # a linear skip connection per layer, MLP input -> output (W_skip; clt/model.py)

    def __post_init__(self) -> None:
        from clt_forge.clt.activations import make_activation
        from clt_forge.clt.init import check_init_encoder
        from clt_forge.clt.native import MODES
        from clt_forge.clt.sparse_decode import DECODE

        make_activation(self.activation, self.k)  # a ConfigError / ValueError naming the fix
        check_init_encoder(self.init_encoder)
        DECODE.lookup(self.decode)
        if self.native_kernel not in MODES:
            raise ValueError(f"clt.native_kernel={self.native_kernel!r}: use auto, on or off.")


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.none  # metrics.jsonl is always written; this adds a logger
    project: str = "clt-forge"  # wandb project
    mode: str = "offline"  # wandb mode unless WANDB_MODE is set


@dataclass
class PipelineConfig:
    """What every stage shares, so the same override list works for every stage."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    quant: QuantSpec = MISSING
    sharding: ShardingConfig = MISSING
    sparsity: SparsityConfig = MISSING
    clt: CLTConfig = MISSING
    logger: LoggerConfig = MISSING
    runs: str = "runs"  # root folder of run directories
    out: str | None = None  # where the stage writes; None: the Hydra run directory
    seed: int = 0  # seeds torch, numpy and python in every stage
    threads: int = 0  # torch threads; 0: leave torch's default


@dataclass
class ShardConfig:
    index: int = 0  # this job's shard, 0 <= index < count
    count: int = 1  # number of independent caching jobs


@dataclass
class CacheConfig(PipelineConfig):
    tokens: int = 8192  # tokens to cache (all shards together; BOS not counted)
    chunk_tokens: int = 1024  # tokens per chunk file (rounded down to whole windows)
    batch_size: int = 8  # context windows per model forward
    shard: ShardConfig = field(default_factory=ShardConfig)
    held_out_tokens: int = 2048  # also cache this many held-out tokens into out/held_out (shard 0)
    merge: bool = False  # only merge the finished shards in out= into one dataset
    encode: EncodeMode = EncodeMode.auto  # where chunks are quantized, compressed and written


@dataclass
class OptimConfig:
    """Adam, its learning-rate schedule, and global-norm gradient clipping."""

    lr: float = 2e-4
    lr_schedule: str = "constant"  # shape after the warm-up
    lr_warmup_fraction: float = 0.01  # share of steps with linear warm-up from 0
    lr_final_fraction: float = 0.1  # linear / cosine decay end, as a fraction of lr
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # global gradient norm bound; 0 disables
    decoder_grad: str = "full"  # full: W_dec.grad; blocks: built per source in Adam; rows: row-lazy Adam
    exp_avg_dtype: str = "float32"  # W_dec's Adam first moment: float32, or bfloat16 (decoder_grad=blocks only)

    def __post_init__(self) -> None:
        if self.decoder_grad not in ("full", "blocks", "rows"):
            raise ValueError(f"optim.decoder_grad={self.decoder_grad!r}: use full, blocks or rows.")
        if self.exp_avg_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"optim.exp_avg_dtype={self.exp_avg_dtype!r}: use float32 or bfloat16.")
        if self.exp_avg_dtype != "float32" and self.decoder_grad != "blocks":
            raise ConfigError(
                f"optim.exp_avg_dtype={self.exp_avg_dtype} needs optim.decoder_grad=blocks (it is "
                f"{self.decoder_grad}: torch's Adam keeps its moments in the parameter's dtype)."
            )


@dataclass
class ReaderConfig:
    """How the activation dataset is read (see clt_forge/artifacts/reader.py)."""

    shuffle_chunks: int = 4  # chunks whose tokens are shuffled together
    prefetch_groups: int = 2  # groups decoded ahead of training
    workers: int = 2  # decoding threads
    skip_corrupt: bool = False  # warn and skip a chunk failing its checksum instead of stopping


@dataclass
class FinetuneConfig:
    """Low-rank finetuning of a pretrained CLT (`finetune.from=CKPT finetune.rank=R`)."""

    source: str | None = None  # a checkpoint to finetune (CLI alias: finetune.from)
    rank: int = 8  # rank of the adapters on W_enc and W_dec


@dataclass
class TrainConfig(PipelineConfig):
    tokens: int = 1_000_000  # tokens to train on
    activations: str | None = None  # an activation dataset from `clt cache`
    batch_size: int = 1024  # tokens per optimizer step (the global batch, over all ranks)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: Precision = Precision.fp32
    grad_scale_init: float = 65536.0  # fp16: initial loss scale; an overflowing step is skipped and halves it
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu; or cpu / cuda
    log_every: int = 10  # steps between training-metric lines
    eval_every: int = 100  # steps between held-out evaluations
    eval_tokens: int = 2048  # held-out tokens per evaluation
    checkpoint_every: int = 500  # steps between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept (the newest ones)
    checkpoint_l0: list[float] = field(default_factory=list)  # save when mean L0 first falls below each
    optimal_l0: float | None = None  # stop (and save) when mean L0 falls below this
    dead_window_tokens: int = 100_000  # a feature not active for this many tokens is dead
    normalization: NormalizationMethod = NormalizationMethod.rms  # per-layer scale (docs/quality.md)
    layer_weights: list[float] = field(default_factory=list)  # loss weight of target layer 0, 1, ... (rest: 1)
    norm_batches: int = 8  # batches to estimate normalisation when the dataset has no statistics
    keep_freed_memory: bool = True  # CPU, after step 1: malloc reuses freed tensors' pages (clt_forge/heap.py)
    windows_per_forward: int = 8  # data.source=model: context windows per model forward
    resume: str | None = None  # a `clt train` run folder to continue exactly
    plot: str | None = None  # only (re)draw the plots of this run folder
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class ExplainerConfig:
    """Which language model writes and scores feature explanations (clt_forge/autointerp/explainers.py)."""

    kind: str = "local"  # a registered explainer (tokens, local, openai, ...) or none
    model: str = "smollm2_135m"  # local: a model config name (conf/model); openai: the endpoint's model
    base_url: str | None = None  # openai: the endpoint, e.g. http://127.0.0.1:8080/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key
    max_new_tokens: int = 40  # length bound of one explanation
    temperature: float = 0.0  # 0: greedy
    concurrency: int = 4  # openai: requests in flight at once
    retries: int = 3  # openai: attempts per request (exponential back-off)
    timeout_s: float = 60.0  # openai: per request
    candidates: int = 3  # local / openai: answers per feature; the best-scoring acceptable one is kept
    sample_temperature: float = 0.7  # local / openai: sampling temperature of the candidates after the first
    judge: str | None = None  # judge of detection questions: literal, local, openai; null: this kind (tokens: literal)


@dataclass
class WorkerConfig:
    """Which slice of the features this process handles (SLURM array friendly)."""

    index: int = 0
    count: int = 1


@dataclass
class AutointerpConfig(PipelineConfig):
    explainer: ExplainerConfig = MISSING
    tokens: int = 100_000  # tokens to scan (per worker: every worker reads the same tokens)
    activations: str | None = None  # an activation dataset (else the model runs on the fly)
    checkpoint: str | None = None  # a CLT checkpoint from `clt train`
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    features_from: str | None = None  # only the features in this graph JSON (else all)
    batch_size: int = 4096  # tokens per encoder step (whole windows; more amortises the bookkeeping)
    top_k: int = 20  # top activating contexts kept per feature
    context_before: int = 24  # tokens shown before the activating token
    context_after: int = 8  # tokens shown after it
    quantiles: int = 4  # activation quantile bands sampled for scoring / display
    per_quantile: int = 5  # contexts sampled per band
    non_activating: int = 10  # contexts sampled where the feature is silent
    silent_every: int = 1024  # tokens per silent-context probe (more probes: more candidates, more work)
    histogram_bins: int = 32  # bins of the activation histogram
    top_logits: int = 10  # decoder direction through the unembedding: top / bottom tokens
    explain: bool = True  # run the explainer
    score: bool = True  # run the detection scorer
    score_examples: int = 40  # held-out contexts per feature shown to the scorer (half firing, half silent)
    scorer: str = "token"  # token: is the marked token one it fires on; context: does it fire in this text
    dry_run: bool = False  # print one explanation prompt and stop
    export: str | None = None  # also write circuit-tracer feature JSON files here
    merge: str | None = None  # only merge the per-worker databases in this folder


@dataclass
class AttributionSettings:
    """circuit-tracer's `attribute` options and the pruning thresholds: AttributionRunner's settings,
    and (inherited) the keys of `clt attribute`."""

    max_n_logits: int = 10  # at most this many output logits become attribution targets
    desired_logit_prob: float = 0.95  # ... or fewer, once they cover this probability
    batch_size: int = 256  # backward passes per batch
    max_feature_nodes: int | None = 2048  # features attributed (most influential first); null: all
    offload: Offload | None = None  # park model parts in cpu memory or on disk while attributing
    node_threshold: float = 0.8  # pruning: keep nodes carrying this share of the influence
    edge_threshold: float = 0.98  # pruning: keep edges carrying this share of the influence
    verbose: bool = True  # progress bar and timings
    fit_to_machine: bool = True  # lower batch_size / max_feature_nodes to fit memory and max_minutes
    max_minutes: float | None = 5.0  # on a CPU, attribute this long at most (estimated); null: no cap
    memory_fraction: float = 0.8  # of the memory available when attribution starts
    allow_over_memory: bool = False  # run even when the estimate exceeds that memory


@dataclass
class AttributeConfig(PipelineConfig, AttributionSettings):
    checkpoint: str | None = None  # a CLT checkpoint from `clt train`
    features: str | None = None  # a feature database from `clt autointerp` (labels)
    prompt: str | None = 'The opposite of "large" is "'  # the text to attribute; null: none
    prompts: str | None = None  # a text file with one prompt per line (instead of prompt)
    slug: str | None = None  # the graph's file name; None: made from the prompt's words
    export: str | None = None  # also write the CLT in circuit-tracer's on-disk format here
    device: str | None = None  # None: the model config's device


@dataclass
class ServeConfig(PipelineConfig):
    graph: str | None = None  # a graph JSON from `clt attribute`, or a folder of them
    checkpoint: str | None = None  # overrides the checkpoint the graph records
    features: str | None = None  # overrides the feature database the graph records
    host: str = "127.0.0.1"  # interface to bind
    port: int = 8050  # port to bind


@dataclass
class DemoConfig(PipelineConfig):
    """`clt demo`: every stage on the embedded default, into one run folder (runs/demo)."""

    sparsity: SparsityConfig = MISSING  # any schedule; conf/demo_sparsity/<name>.yaml sets the demo's own values for it
    explainer: ExplainerConfig = MISSING
    prompt: str = 'The opposite of "large" is "'  # the prompt attributed
    slug: str = "opposite"  # the graph's file name: <out>/graphs/<slug>.json
    cache_tokens: int = 65_536  # tokens of text cached (plus 2,048 held out)
    train_tokens: int = 65_536  # tokens the CLT trains on
    batch_size: int = 256  # training batch
    lr: float = 4e-3  # training learning rate (cosine schedule; docs/quality.md)
    layer_weights: list[float] = field(default_factory=lambda: [10.0])  # train.layer_weights (docs/quality.md)
    autointerp_tokens: int = 65_536  # tokens scanned for feature examples
    autointerp_per_quantile: int = 30  # per_quantile of autointerp: more sampled contexts for the tokens label
    max_feature_nodes: int = 2048  # features attributed (as `clt attribute`; 256 scored 0.30 / 0.74, docs/quality.md)
    eval_windows: int = 16  # held-out windows the replacement model is scored on (quality.json)


STAGE_SCHEMAS: dict[str, type[Any]] = {
    "cache": CacheConfig,
    "train": TrainConfig,
    "autointerp": AutointerpConfig,
    "attribute": AttributeConfig,
    "serve": ServeConfig,
    "demo": DemoConfig,
}

GROUP_SCHEMAS: dict[str, type[Any]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "quant": QuantSpec,
    "sharding": ShardingConfig,
    "sparsity": SparsityConfig,
    "clt": CLTConfig,
    "logger": LoggerConfig,
    "explainer": ExplainerConfig,
}
