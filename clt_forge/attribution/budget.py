"""What an attribution will cost before it starts: peak memory and time, from the prompt's
active features, and the largest settings that fit the machine.

circuit-tracer 0.5.0's `attribute` (read in circuit_tracer/attribution/) holds, beyond the
model and the CLT:
- the active features' decoder rows, one per (feature, target layer >= its layer), scaled by
  the activation: sum_t D_t rows of d_model floats, where D_t counts the active features of
  layers <= t; the backward hooks keep a second, per-target-layer copy of them;
- inside each backward pass, the hook of target layer t gathers the gradient at every
  decoder row's position for every batch element: batch x D_t x d_model floats (the largest,
  t = L-1, has D = all active features: this term is what grows to tens of GB when a briefly
  trained CLT leaves thousands of features active per token);
- the row buffer (n_active + (L+1) n_pos rows x batch), the edge matrix (max_feature_nodes +
  n_logits rows x every node) and the final square adjacency;
- one forward of `batch` copies of the prompt whose activations the backward passes reuse.
Time: one backward through the blocks per batch of source nodes (n_logits, then
max_feature_nodes of them), about 4 x block parameters x batch x n_pos flops, plus the
hooks' contractions (2 x batch x D_t x d_model flops per target layer), at a measured rate.
`choose` keeps the configured values when they fit and otherwise halves the batch (memory)
and lowers max_feature_nodes (time), down to one batch of features.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from clt_forge.config.schema import AttributionSettings
from clt_forge.errors import CLTError

FLOAT = 4  # circuit-tracer keeps rows, buffers and the adjacency in float32
FEATURE_SHARE = 0.6  # a feature batch's backward against a logit batch's (measured 0.1-0.6: docs/performance.md)
MIN_BATCH = 8


@dataclass(frozen=True)
class AttributionShape:
    """Everything the cost depends on that the settings do not choose."""

    active_per_layer: tuple[int, ...]  # active (feature, position) pairs per CLT layer
    n_pos: int
    d_model: int
    d_mlp: int
    n_heads: int
    block_params: int  # parameters of the transformer blocks (what a backward pass crosses)

    @property
    def n_layers(self) -> int:
        return len(self.active_per_layer)

    @property
    def n_active(self) -> int:
        return sum(self.active_per_layer)

    def decoder_rows(self) -> list[int]:
        """D_t: decoder rows writing to target layer t (active features of layers <= t)."""
        return list(itertools.accumulate(self.active_per_layer))


@dataclass(frozen=True)
class Rates:
    """This device's measured speed: flop/s of block-sized matmuls, gradient floats gathered
    and contracted per second by the attribution hooks."""

    flops: float
    gather: float


@dataclass(frozen=True)
class AttributionCost:
    batch_size: int
    max_feature_nodes: int  # features actually attributed (<= the active count)
    n_logits: int
    peak_bytes: int  # beyond the model and the CLT
    seconds: float

    def describe(self) -> str:
        return (
            f"batch_size={self.batch_size}, max_feature_nodes={self.max_feature_nodes}: "
            f"~{self.peak_bytes / 2**30:.1f} GiB beyond the model, ~{self.seconds / 60:.1f} min"
        )


def estimate(
    shape: AttributionShape, batch_size: int, max_feature_nodes: int | None, n_logits: int, rates: Rates
) -> AttributionCost:
    s, L, P = shape, shape.n_layers, shape.n_pos
    features = min(max_feature_nodes or s.n_active, s.n_active)
    rows = s.decoder_rows()
    nodes = s.n_active + (L + 1) * P + n_logits
    final = features + (L + 1) * P + n_logits
    per_token_layer = 12 * s.d_model + 4 * s.d_mlp + 2 * s.n_heads * P  # activations a backward reuses
    held = (
        2 * sum(rows) * s.d_model  # decoder rows + the hooks' per-layer copies
        + s.n_active * s.d_model  # encoder rows
        + (features + n_logits) * nodes  # edge matrix
        + 2 * final * final  # column-selected copy + the square adjacency
        + batch_size * P * L * per_token_layer  # the batched forward
    )
    transient = batch_size * max(rows, default=0) * s.d_model + (s.n_active + (L + 1) * P) * batch_size
    # a backward from the logits runs every layer's hook: it gathers batch x D_t x d_model floats
    # for each target layer t; one from features of layer l only the hooks below l (FEATURE_SHARE)
    full = 4 * s.block_params * batch_size * P / rates.flops + batch_size * sum(rows) * s.d_model / rates.gather
    precompute = 2 * sum(rows) * s.d_model / rates.gather + 2 * s.block_params * batch_size * P / rates.flops
    seconds = precompute + math.ceil(n_logits / batch_size) * full
    seconds += math.ceil(features / batch_size) * full * FEATURE_SHARE
    return AttributionCost(batch_size, features, n_logits, FLOAT * (held + transient), seconds)


def choose(
    shape: AttributionShape,
    batch_size: int,
    max_feature_nodes: int | None,
    n_logits: int,
    rates: Rates,
    memory_bytes: float,
    seconds: float | None,
) -> AttributionCost:
    """The configured settings if they fit `memory_bytes` and `seconds`; else smaller ones: the
    batch halved until the memory fits, then the features (and the batch with them) lowered until
    the time fits, down to MIN_BATCH features. What cannot fit even then is returned as it is."""
    cost = estimate(shape, batch_size, max_feature_nodes, n_logits, rates)
    while cost.peak_bytes > memory_bytes and cost.batch_size > MIN_BATCH:
        cost = estimate(shape, cost.batch_size // 2, max_feature_nodes, n_logits, rates)
    if seconds is not None and cost.seconds > seconds:
        batch = cost.batch_size

        def timed(features: int) -> AttributionCost:  # a batch never larger than the features
            return estimate(shape, min(batch, features), features, n_logits, rates)

        low, high = min(MIN_BATCH, cost.max_feature_nodes), cost.max_feature_nodes
        while low < high:  # the largest feature count that fits the time
            mid = (low + high + 1) // 2
            low, high = (mid, high) if timed(mid).seconds <= seconds else (low, mid - 1)
        cost = timed(low)
    return cost


def available_memory(device: torch.device) -> float:
    """Bytes this process can still take: free GPU memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def measure_rates(device: torch.device, d_model: int, d_mlp: int, seconds: float = 0.2) -> Rates:
    """Time the two kinds of work an attribution is made of on `device` (~2 x `seconds`)."""
    a, b = torch.randn(512, d_model, device=device), torch.randn(d_model, d_mlp, device=device)
    grads, vecs = torch.randn(16, 8, d_model, device=device), torch.randn(4096, d_model, device=device)
    where = torch.randint(0, 8, (4096,), device=device)

    def gather() -> torch.Tensor:  # what circuit-tracer's score hook does per target layer
        return torch.einsum("bpd,pd->pb", grads[:, where], vecs)

    return Rates(
        _rate(lambda: a @ b, 2 * 512 * d_model * d_mlp, device, seconds),
        _rate(gather, 16 * 4096 * d_model, device, seconds),
    )


def _rate(work: Any, amount: float, device: torch.device, seconds: float) -> float:
    work()  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        work()
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return amount * runs / (time.perf_counter() - start)


def prompt_shape(model: Any, ids: list[int]) -> AttributionShape:
    """The active features of a circuit-tracer ReplacementModel on `ids` (one forward, no
    decoder rows gathered), and the model's sizes."""
    tokens = torch.tensor(ids, device=model.cfg.device)
    cache, hooks, _ = model.get_caching_hooks(lambda name: model.feature_input_hook in name)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=model.cfg.n_layers)
        inputs = torch.cat(list(cache.values()), dim=0)
        features, _ = model.transcoders.encode_sparse(inputs, zero_positions=model.zero_positions)
    layers = features.coalesce().indices()[0]
    per_layer = torch.bincount(layers, minlength=model.cfg.n_layers).tolist()
    blocks = sum(p.numel() for block in model.blocks for p in block.parameters())
    cfg = model.cfg
    return AttributionShape(tuple(per_layer), len(ids), cfg.d_model, cfg.d_mlp, cfg.n_heads, blocks)


def model_rates(model: Any) -> Rates:
    """The rates of the device a circuit-tracer ReplacementModel runs on, at its sizes (~0.4 s):
    measure once per model and pass them to every plan_attribution."""
    return measure_rates(torch.device(model.cfg.device), model.cfg.d_model, model.cfg.d_mlp)


def plan_attribution(
    model: Any, ids: list[int], settings: AttributionSettings, rates: Rates | None = None
) -> AttributionCost:
    """The batch size and feature count to attribute `ids` with, said on stdout; a CLTError when
    even the smallest settings (or, without fit_to_machine, the given ones) exceed the memory.
    `rates`: the device's (model_rates), measured here when not given."""
    s = settings
    shape = prompt_shape(model, ids)
    device = torch.device(model.cfg.device)
    rate = rates if rates is not None else model_rates(model)
    memory = available_memory(device) * s.memory_fraction
    minutes = s.max_minutes if device.type == "cpu" else None
    asked = estimate(shape, s.batch_size, s.max_feature_nodes, s.max_n_logits, rate)
    cost = asked
    if s.fit_to_machine:
        cost = choose(
            shape,
            s.batch_size,
            s.max_feature_nodes,
            s.max_n_logits,
            rate,
            memory,
            None if minutes is None else minutes * 60,
        )
    found = f"{shape.n_active} active features over {shape.n_pos} positions"
    if cost.peak_bytes > memory and not s.allow_over_memory:
        raise CLTError(
            f"attribution would need {cost.describe()}, but memory_fraction={s.memory_fraction} of the "
            f"{memory / s.memory_fraction / 2**30:.1f} GiB available is {memory / 2**30:.1f} GiB: the prompt has "
            f"{found}, and circuit-tracer gathers batch_size x (active features) x d_model floats per backward "
            "pass. Use a shorter prompt, a CLT trained longer (fewer active features), a smaller batch_size, "
            "or allow_over_memory=true to try anyway."
        )
    changed = "" if cost == asked else f" (asked: {asked.describe()}; fit_to_machine=false keeps it)"
    print(f"attribution: {found}; {cost.describe()}{changed}", flush=True)
    return cost
