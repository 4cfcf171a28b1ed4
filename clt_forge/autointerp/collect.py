"""The streaming pass: per-feature evidence in memory O(features x K), never O(tokens).

For every selected feature (a worker's slice of every layer's encoder), one pass over the
token stream keeps:

- the top-K activations with their context windows (token ids and the feature's activation
  on every token of the window);
- a uniform random sample of R activating tokens (priority sampling: each token gets one
  random key u_t, and a feature keeps its R largest keys among the tokens it fires on, which
  is a uniform sample of them; these become the quantile examples and the scorer's
  held-out firing contexts);
- a uniform random sample of M silent contexts (the window around a few random tokens per
  batch where the feature is 0 on every token shown);
- the count, sum and max of activations and a histogram on fixed log-spaced bins.

Everything is computed from the sparse list of active (token, feature) entries (a CLT
fires on a few percent of features), one layer's block of features at a time, right after
that layer's encoder GEMM wrote it (features are independent, and the block is still in
cache). The bookkeeping is numpy on that block: per-feature arrays are spread over the
entries with np.repeat instead of gathered, and small per-feature updates skip torch's
thread pool. Only the candidates that can enter a reservoir reach the merges: above the
feature's current floor and, while floors are low (the first batches), in the histogram
bin / key bucket of the feature's K-th largest key of the batch or above (an exact superset
of the survivors). A merge finds the survivors by comparing the candidates, sorted, with
the sorted old keys (torch's topk settles the rows with a tie at the K-th key, as it always
did) and copies each new context window as one opaque item. benchmarks/autointerp.py
measures the bookkeeping against the encoder alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["HIST_EDGES", "Collector", "Contexts", "FeatureSlice"]

# Fixed histogram bins over activations (CLT units): each octave 2^k .. 2^(k+1), k = -10..9
# (~1e-3 .. 1e3), split in four equal parts, i.e. edges 2^k (1 + j/4). Bin 0 holds values below
# HIST_EDGES[0], bin i in 1..80 holds [HIST_EDGES[i-1], HIST_EDGES[i]), bin 81 values from
# HIST_EDGES[80] up. A float32's exponent and top two mantissa bits are exactly its bin, so
# binning is one shift of the bit pattern (see `Collector._block`).
LOWEST_OCTAVE, OCTAVES = -10, 20
HIST_EDGES = torch.tensor(
    [2.0**k * (1 + j / 4) for k in range(LOWEST_OCTAVE, LOWEST_OCTAVE + OCTAVES) for j in range(4)]
    + [2.0 ** (LOWEST_OCTAVE + OCTAVES)],
    dtype=torch.float64,
)
_FIRST_KEY = (LOWEST_OCTAVE + 127) << 2  # (biased exponent, top 2 mantissa bits) of HIST_EDGES[0]
_N_BINS = len(HIST_EDGES) + 1
# the smallest float32 of each bin (bin 0: -inf), so that `value >= _BIN_FLOOR[b]` <=> bin(value) >= b
_BIN_FLOOR = np.concatenate(
    [
        np.array([-np.inf], np.float32),
        ((np.arange(1, _N_BINS) + _FIRST_KEY - 1) << 21).astype(np.int32).view(np.float32),
    ]
)
_KEY_BUCKETS = 64  # buckets of the sample keys u in [0, 1) for the candidate pre-filter
_INF32 = np.float32(np.inf)


@dataclass
class FeatureSlice:
    """The encoder of the selected features, per layer, in normalised units."""

    layers: list[int]  # layer of each selected feature, flattened order (layer-major)
    features: list[int]  # index within its layer
    W_enc: list[torch.Tensor]  # per layer [n_l, D] (n_l may be 0)
    b_enc: list[torch.Tensor]  # per layer [n_l]
    threshold: list[torch.Tensor]  # per layer [n_l]
    in_scale: torch.Tensor  # [L]

    @property
    def size(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def encode(
        self, mlp_in: torch.Tensor, each: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """JumpReLU features of the raw MLP inputs [T, L, D], feature-major: z [N, T].

        Each layer's GEMM writes its rows of the output in place (no concatenation); `each(row,
        z_rows, mask_rows)` (if given) sees every layer's block as soon as it is written, with
        its mask z > 0 (the JumpReLU's own comparison; valid only during the call)."""
        z = mlp_in.new_empty(self.size, mlp_in.shape[0])
        scratch = torch.empty(max((W.shape[0] for W in self.W_enc), default=0), z.shape[1], dtype=torch.bool)
        row = 0
        for layer, (W, b, theta) in enumerate(zip(self.W_enc, self.b_enc, self.threshold, strict=True)):
            n = W.shape[0]
            if n == 0:
                continue
            h, mask = z[row : row + n], scratch[:n]
            torch.addmm(b[:, None], W, mlp_in[:, layer].T, alpha=1.0 / float(self.in_scale[layer]), out=h)
            torch.gt(h, theta[:, None], out=mask)
            h.mul_(mask)
            if each is not None:
                each(row, h, mask)
            row += n
        return z


@dataclass
class Contexts:
    """K kept entries per feature: key, global token position, window tokens and activations.

    Slots are unordered; `ordered(row)` lists a row's filled slots by key, largest first."""

    keys: torch.Tensor  # [N, K] float32 (-inf: empty); slots are unordered
    floor: torch.Tensor  # [N] the smallest kept key: candidates must beat it
    values: torch.Tensor  # [N, K] activation at the centre token
    positions: torch.Tensor  # [N, K] int64 global token index (-1: empty)
    tokens: torch.Tensor  # [N, K, C] int32 (-1: outside the window)
    acts: torch.Tensor  # [N, K, C] float32

    @classmethod
    def empty(cls, n: int, k: int, width: int) -> Contexts:
        return cls(
            torch.full((n, k), -torch.inf),
            torch.full((n,), -torch.inf),
            torch.zeros(n, k),
            torch.full((n, k), -1, dtype=torch.int64),
            torch.full((n, k, width), -1, dtype=torch.int32),
            torch.zeros(n, k, width),
        )

    def ordered(self, row: int) -> list[int]:
        keys = self.keys[row]
        return [int(i) for i in torch.argsort(keys, descending=True, stable=True) if keys[i] > -torch.inf]


@dataclass
class _Batch:
    """What every block of one batch shares."""

    u: np.ndarray  # [T] the sample key of each token
    probes: np.ndarray  # [P] the silent probes (flat token indices)
    spans: list[tuple[int, int]]  # each probe's context, clipped to its window: [lo, hi)
    probe_keys: np.ndarray  # [P] the silent sample key of each probe
    ids: np.ndarray  # [W, before + S + after] int32 token ids of each window, padded with -1
    length: int  # S, tokens per window
    offset: int  # global index of the batch's first token


class Collector:
    def __init__(
        self,
        features: FeatureSlice,
        *,
        top_k: int,
        sample: int,
        silent: int,
        before: int,
        after: int,
        seed: int = 0,
        silent_every: int = 1024,
    ) -> None:
        n = features.size
        self.features = features
        self.before, self.after = before, after
        self.width = before + after + 1
        self.top = Contexts.empty(n, top_k, self.width)
        self.sample = Contexts.empty(n, sample, self.width)
        self.silent = Contexts.empty(n, silent, self.width)
        self.count = torch.zeros(n, dtype=torch.int64)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.max = torch.zeros(n)
        self.histogram = torch.zeros(n, len(HIST_EDGES) + 1, dtype=torch.int64)
        self.tokens_seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.silent_every = silent_every

    # ---- one batch of whole windows -------------------------------------------------------

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, mlp_in: torch.Tensor, bookkeeping: bool = True) -> torch.Tensor:
        """tokens [W, S] and raw MLP inputs [W, S, L, D] of W whole windows; returns z [N, T].

        The bookkeeping runs on each layer's block of features as soon as its GEMM wrote it
        (features are independent; the random draws are made up front, in a fixed order)."""
        n_windows, length = tokens.shape
        x = mlp_in.reshape(n_windows * length, *mlp_in.shape[2:])
        if not bookkeeping:
            z = self.features.encode(x)
        else:
            total = n_windows * length
            u = torch.rand(total, generator=self.generator).numpy()
            probes, spans = self._probes(length, total)
            probe_keys = torch.rand(len(probes), generator=self.generator).numpy()
            ids = np.full((n_windows, self.before + length + self.after), -1, np.int32)
            ids[:, self.before : self.before + length] = tokens.numpy()
            batch = _Batch(u, probes, spans, probe_keys, ids, length, self.tokens_seen)
            z = self.features.encode(x, each=lambda row, h, mask: self._block(row, h.numpy(), mask.numpy(), batch))
        self.tokens_seen += n_windows * length
        return z

    def _probes(self, length: int, total: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """One random token per stratum of `silent_every` tokens, and its context window."""
        stride = max(self.silent_every, self.width)
        n_probes = max(1, total // stride)
        jitter = torch.randint(0, stride - self.width + 1, (n_probes,), generator=self.generator)
        probes = (torch.arange(n_probes) * stride + jitter + self.before).clamp_max(total - 1)
        starts = probes - probes % length  # first token of each probe's context window
        lo = torch.maximum(probes - self.before, starts).tolist()
        hi = torch.minimum(probes + self.after + 1, starts + length).tolist()
        return probes.numpy(), list(zip(lo, hi, strict=True))

    def _block(self, row: int, h: np.ndarray, mask: np.ndarray, batch: _Batch) -> None:
        """All the bookkeeping of one layer's block of features: rows row.. of z (h [n, T], mask
        h > 0), while it is still in cache."""
        n, total = h.shape
        rows = slice(row, row + n)
        # the active entries, feature-major: per-feature arrays are spread over them by np.repeat
        # (sequential writes) rather than gathered by feature index
        flat = _flatnonzero(mask)
        values = h.reshape(-1).take(flat)
        counts = np.diff(np.searchsorted(flat, np.arange(0, (n + 1) * total, total)))
        f = np.repeat(np.arange(n), counts)
        t = flat - np.repeat(np.arange(0, n * total, total), counts)

        # (numpy on the small per-feature arrays too: a threaded torch op costs more than it does)
        self.count.numpy()[rows] += counts
        self.total.numpy()[rows] += np.bincount(f, weights=values, minlength=n)  # in entry order, as ever
        nonempty = np.flatnonzero(counts)
        if len(nonempty):
            block_max = np.maximum.reduceat(values, (np.cumsum(counts) - counts)[nonempty])
            np.maximum(self.max.numpy()[row + nonempty], block_max, out=block_max)
            self.max.numpy()[row + nonempty] = block_max
        bins = values.view(np.int32) >> 21  # (exponent, top 2 mantissa bits): the bin, offset by _FIRST_KEY - 1
        np.clip(bins, _FIRST_KEY - 1, _FIRST_KEY - 1 + _N_BINS - 1, out=bins)
        first_bin = np.repeat(np.arange(0, n * _N_BINS, _N_BINS) - (_FIRST_KEY - 1), counts)  # of each entry's row
        histogram = np.bincount(first_bin + bins, minlength=n * _N_BINS).reshape(n, _N_BINS)
        self.histogram.numpy()[rows] += histogram

        # top-K candidates: above the floor, and in the bin of the block's K-th largest value or above
        k = self.top.keys.shape[1]
        kth_bin = (np.cumsum(histogram[:, ::-1], axis=1) >= k).sum(1) - 1  # -1: fewer than K entries
        floor = np.nextafter(self.top.floor.numpy()[rows], _INF32)  # key > floor <=> key >= nextafter(floor)
        keep = np.flatnonzero(values >= np.repeat(np.maximum(floor, _BIN_FLOOR[np.maximum(kth_bin, 0)]), counts))
        self._merge(self.top, row, f[keep], t[keep], values[keep], values[keep], h, batch)

        # sample candidates: key u[t] above the floor; while many pass (low floors), only those in
        # the key bucket of each feature's R-th largest candidate key or above
        r = self.sample.keys.shape[1]
        keys = batch.u.take(t)
        keep = np.flatnonzero(keys >= np.repeat(np.nextafter(self.sample.floor.numpy()[rows], _INF32), counts))
        if len(keep) > 2 * r * n:
            f_keep = f[keep]
            bucket = (keys[keep] * _KEY_BUCKETS).astype(np.int64)  # monotone in the key, 0.._KEY_BUCKETS-1
            per_bucket = np.bincount(f_keep * _KEY_BUCKETS + bucket, minlength=n * _KEY_BUCKETS)
            at_least = np.cumsum(per_bucket.reshape(n, _KEY_BUCKETS)[:, ::-1], axis=1) >= r
            rth_bucket = np.maximum(at_least.sum(1) - 1, 0)
            keep = keep[bucket >= rth_bucket[f_keep]]
        self._merge(self.sample, row, f[keep], t[keep], keys[keep], values[keep], h, batch)

        # silent contexts: a feature silent on the whole context around a probe may keep it
        fires = np.stack([_any_in_rows(mask[:, a:b]) for a, b in batch.spans], axis=1)  # [n, P]
        silent_f, p = np.nonzero(~fires)
        keys = batch.probe_keys[p]
        keep = np.flatnonzero(keys > self.silent.floor.numpy()[rows][silent_f])
        silent_f, p, keys = silent_f[keep], p[keep], keys[keep]
        self._merge(self.silent, row, silent_f, batch.probes[p], keys, np.zeros_like(keys), h, batch)

    # ---- helpers ---------------------------------------------------------------------------

    def _merge(
        self,
        state: Contexts,
        row: int,
        f_idx: np.ndarray,
        t_idx: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        z: np.ndarray,
        batch: _Batch,
    ) -> None:
        """Keep, per feature, the K largest keys among the old entries and these candidates, which
        all beat the feature's floor (ties between candidates: the earlier first). f_idx: feature
        within the block z [n, T] of rows row...

        Slots are unordered: a new entry overwrites the slot of an entry it evicts, so only the
        new entries' contexts are gathered and written (readers sort by key)."""
        k = state.keys.shape[1]
        block = slice(row, row + len(z))
        state_keys, state_floor = state.keys.numpy()[block], state.floor.numpy()[block]
        if len(f_idx) == 0:
            return
        # sort by (feature, key descending, input order); at most K candidates per feature can matter
        order = np.argsort((f_idx << 32) | _descending(keys), kind="stable")
        f_idx, keys, t_idx, values = f_idx[order], keys[order], t_idx[order], values[order]
        per_row = np.bincount(f_idx, minlength=len(z))
        rows = np.flatnonzero(per_row)
        counts = per_row[rows]
        starts = np.cumsum(counts) - counts
        rank = np.arange(len(f_idx)) - np.repeat(starts, counts)
        first_k = np.flatnonzero(rank < k)
        new = np.full((len(rows), k), -np.inf, np.float32)  # each touched row's candidate keys, descending
        new[np.repeat(np.arange(len(rows)), counts)[first_k], rank[first_k]] = keys[first_k]
        old = state_keys[rows]
        # the top K of old + new: new[j] replaces the j-th smallest old key while it is larger
        old_sorted = np.sort(old, axis=1)
        n_new = (new > old_sorted).sum(1)
        at = np.arange(len(rows))
        below, above = np.maximum(n_new - 1, 0), np.minimum(n_new, k - 1)
        kept_min = np.minimum(
            np.where(n_new < k, old_sorted[at, above], np.inf), np.where(n_new > 0, new[at, below], np.inf)
        )
        dropped_max = np.maximum(
            np.where(n_new > 0, old_sorted[at, below], -np.inf), np.where(n_new < k, new[at, above], -np.inf)
        )
        # a tie at the K-th key: which of the tied entries stay is topk's choice (as it always was)
        tied = np.flatnonzero(kept_min == dropped_max)
        clear = np.flatnonzero(kept_min != dropped_max)
        pair_row, slot = np.nonzero(old[clear] < kept_min[clear, None])  # the evicted slots, in slot order
        pair_row = clear[pair_row]
        column = np.arange(len(slot)) - np.repeat(np.cumsum(n_new[clear]) - n_new[clear], n_new[clear])  # = rank
        if len(tied):
            tied_row, tied_slot, tied_column = _topk_pairs(old[tied], new[tied])
            pair_row = np.concatenate([pair_row, tied[tied_row]])
            slot, column = np.concatenate([slot, tied_slot]), np.concatenate([column, tied_column])
        chosen = starts[pair_row] + column
        feature, t_new = rows[pair_row], t_idx[chosen]
        state_keys[feature, slot] = keys[chosen]
        state.values.numpy()[block][feature, slot] = values[chosen]
        state.positions.numpy()[block][feature, slot] = t_new + batch.offset
        self._write_contexts(state, block, feature, slot, t_new, z, batch)
        state_floor[rows] = kept_min  # the K-th largest key: the smallest kept, whichever tied one stayed

    def _write_contexts(
        self,
        state: Contexts,
        block: slice,
        feature: np.ndarray,
        slot: np.ndarray,
        t: np.ndarray,
        z: np.ndarray,
        batch: _Batch,
    ) -> None:
        """Write the context windows around flat token indices t [M] into (feature, slot) of the
        block's rows: token ids (-1 outside the context window t belongs to) and the feature's
        activations there (0 outside); column `before` is t itself."""
        length, total, width = batch.length, z.shape[1], self.width
        where = feature * state.keys.shape[1] + slot
        window, position = np.divmod(t, length)
        ids = _rows(batch.ids, width)[window * batch.ids.shape[1] + position]
        _items(state.tokens.numpy()[block], width)[where] = ids
        acts = _windows(z.reshape(-1), feature * total + t - self.before, width)
        # zero the columns outside t's context window: where the padded token ids are -1
        np.copyto(acts, np.float32(0), where=ids.view(np.int32).reshape(len(t), width) < 0)
        _items(state.acts.numpy()[block], width)[where] = _items(acts, width)


def _topk_pairs(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose K-th and (K+1)-th largest key of old [R, K] + new [R, K] (descending, -inf
    padded) tie: torch's topk picks the survivors. Returns (row, evicted slot, new column) of each
    new entry: evicted slots in slot order take the surviving new entries in column order."""
    k = old.shape[1]
    best = torch.from_numpy(np.concatenate([old, new], axis=1)).topk(k, dim=1).indices.numpy()
    survives = np.zeros((len(old), 2 * k), np.bool_)
    np.put_along_axis(survives, best, True, axis=1)
    survives[:, k:] &= new > -np.inf  # padding never counts as a new entry
    evicted_slots = np.argsort(survives[:, :k], axis=1, kind="stable")  # evicted first
    new_columns = np.argsort(~survives[:, k:], axis=1, kind="stable")  # survivors first
    pair_row, pair_j = np.nonzero(np.arange(k) < survives[:, k:].sum(1, keepdims=True))
    return pair_row, evicted_slots[pair_row, pair_j], new_columns[pair_row, pair_j]


def _descending(keys: np.ndarray) -> np.ndarray:
    """uint32 sort keys (as int64) that order float32 keys descending (-0.0 and 0.0 alike)."""
    bits = (keys + np.float32(0)).view(np.uint32).astype(np.int64)
    ascending = np.where(bits >> 31, 0xFFFFFFFF - bits, bits | 0x80000000)
    return 0xFFFFFFFF - ascending


def _rows(a: np.ndarray, width: int) -> np.ndarray:
    """The overlapping runs a[s : s + width] of a contiguous array's elements, one opaque item
    each (indexing them copies whole runs: several times faster than a [.., width] view)."""
    flat = a.reshape(-1)
    run = np.dtype((np.void, width * flat.itemsize))
    return np.ndarray(buffer=flat, dtype=run, shape=(len(flat) - width + 1,), strides=flat.strides)


def _flatnonzero(mask: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a bool array, 8 bytes at a time: the nonzero words, then their nonzero
    bytes (twice as fast on a mostly-False mask)."""
    flat = mask.reshape(-1)
    whole = len(flat) // 8 * 8
    words = flat[:whole].view(np.uint64)
    hit_words = np.flatnonzero(words != 0)
    hits = np.flatnonzero(words.take(hit_words).view(np.bool_))
    found = (hit_words.take(hits >> 3) << 3) | (hits & 7)
    if whole < len(flat):
        found = np.concatenate([found, whole + np.flatnonzero(flat[whole:])])
    return found


def _any_in_rows(mask: np.ndarray) -> np.ndarray:
    """Whether each row of a bool [N, w] holds a True, reading 8 bytes at a time."""
    words = np.zeros((mask.shape[0], -(-mask.shape[1] // 8) * 8), np.bool_)
    words[:, : mask.shape[1]] = mask
    return np.asarray(words.view(np.uint64).any(axis=1))


def _items(a: np.ndarray, width: int) -> np.ndarray:
    """A contiguous array's consecutive runs of `width` elements, one opaque item each."""
    return a.reshape(-1, width).view(np.dtype((np.void, width * a.itemsize))).reshape(-1)


def _windows(flat: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """flat[s : s + width] for each start s [M] -> [M, width]; positions outside flat are filled
    from its nearest end (callers mask them)."""
    if len(flat) < width:
        return flat[np.clip(starts[:, None] + np.arange(width), 0, len(flat) - 1)]
    clipped = np.clip(starts, 0, len(flat) - width)
    out = _rows(flat, width)[clipped].view(flat.dtype).reshape(len(starts), width)
    edge = np.flatnonzero(clipped != starts)  # windows that hang over either end: a few at most
    if len(edge):
        out[edge] = flat[np.clip(starts[edge, None] + np.arange(width), 0, len(flat) - 1)]
    return out
