"""Initialisation of a CrossLayerTranscoder: weights, JumpReLU thresholds, and the encoder bias.

The one job of this file: put a freshly built CLT in the starting state used for training.
The weight scales follow the guidance given for Anthropic's CLTs (Circuits Updates, January
2025): encoders W_enc ~ U(-1/sqrt(d_features), 1/sqrt(d_features)), decoders
W_dec ~ U(-1/sqrt(n_layers d_model), 1/sqrt(n_layers d_model)), b_dec = 0, and a JumpReLU
threshold (0.03 by default, in the units of the normalised activations) stored as its log.
`init_encoder_bias` then sets b_enc from a batch so that each layer starts at a chosen L0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    from clt_forge.clt.model import CrossLayerTranscoder

__all__ = ["INIT_ENCODERS", "check_init_encoder", "init_clt", "init_encoder_bias", "tie_encoder_to_decoder"]


INIT_BLOCK = 256  # features per independently seeded block of a seeded init
INIT_ENCODERS = ("uniform", "decoder")  # clt.init_encoder


@torch.no_grad()
def init_clt(
    model: CrossLayerTranscoder,
    jumprelu_threshold: float = 0.03,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    features: slice | None = None,
    d_features: int | None = None,
    encoder: str = "uniform",
) -> None:
    """Weights uniform at the scales above, biases and the skip connection (W_skip) zero,
    threshold = `jumprelu_threshold` everywhere.

    `encoder="decoder"` then turns each feature's encoder column (layer l) along its decoder
    vector to the same layer l, keeping the column's norm: the encoder starts reading the
    direction the feature writes (the tied initialisation of TopK SAEs; `clt.init_encoder`).

    With `seed`, the weights of global feature f come from a generator seeded by (seed, f // 256),
    so `model` may hold only the features `features` of a CLT with `d_features` features per
    layer (a feature shard) and gets exactly that slice of the full CLT's initial weights, at
    any world size, without the full CLT ever being built.
    """
    if jumprelu_threshold <= 0:
        raise ValueError(f"jumprelu_threshold must be positive, got {jumprelu_threshold}")
    total = d_features or model.d_features
    enc_bound = 1.0 / math.sqrt(total)
    dec_bound = 1.0 / math.sqrt(model.n_layers * model.d_model)
    model.b_enc.zero_()
    model.b_dec.zero_()
    if model.W_skip is not None:
        model.W_skip.zero_()
    model.log_threshold.fill_(math.log(jumprelu_threshold))
    check_init_encoder(encoder)
    if seed is None:
        model.W_enc.uniform_(-enc_bound, enc_bound, generator=generator)
        model.W_dec.uniform_(-dec_bound, dec_bound, generator=generator)
    else:
        _seeded_weights(model, enc_bound, dec_bound, seed, features or slice(0, total), total)
    if encoder == "decoder":
        tie_encoder_to_decoder(model)


def check_init_encoder(encoder: str) -> None:
    """`clt.init_encoder` is one of INIT_ENCODERS (else a ValueError naming the key and value)."""
    if encoder not in INIT_ENCODERS:
        raise ValueError(f"clt.init_encoder={encoder!r}: use {' or '.join(INIT_ENCODERS)}.")


def _seeded_weights(
    model: CrossLayerTranscoder, enc_bound: float, dec_bound: float, seed: int, features: slice, total: int
) -> None:
    """The uniform weights of features `features` of a `total`-feature CLT, by seeded blocks."""
    if features.stop - features.start != model.d_features:
        raise ValueError(f"features {features} do not match the model's {model.d_features} features")
    for block in range(features.start // INIT_BLOCK, (features.stop - 1) // INIT_BLOCK + 1):
        first, last = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, total)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        W_enc = torch.empty(model.n_layers, model.d_model, last - first).uniform_(-enc_bound, enc_bound, generator=gen)
        W_dec = torch.empty(last - first, model.n_pairs, model.d_model).uniform_(-dec_bound, dec_bound, generator=gen)
        lo, hi = max(first, features.start), min(last, features.stop)  # the overlap, in global indices
        local = slice(lo - features.start, hi - features.start)
        model.W_enc[:, :, local] = W_enc[:, :, lo - first : hi - first]
        model.W_dec[local] = W_dec[lo - first : hi - first]


@torch.no_grad()
def tie_encoder_to_decoder(model: CrossLayerTranscoder) -> None:
    """W_enc[l][:, f] <- ||W_enc[l][:, f]|| * W_dec[f, (l -> l)] / ||W_dec[f, (l -> l)]||, per layer.
    Feature by feature, so a feature shard gets its slice of the full CLT's tied init."""
    for layer in range(model.n_layers):
        same_layer = model.W_dec[:, model.offsets[layer]]  # [F, D]: each feature's decoder to its own layer
        direction = same_layer / torch.linalg.vector_norm(same_layer, dim=1, keepdim=True).clamp_min(1e-12)
        norms = torch.linalg.vector_norm(model.W_enc[layer], dim=0)  # [F]
        model.W_enc[layer] = (direction * norms[:, None]).t()


@torch.no_grad()
def init_encoder_bias(
    model: CrossLayerTranscoder,
    x_batch: Float[torch.Tensor, "batch n_layers d_model"],
    target_l0: float,
    generator: torch.Generator | None = None,
    *,
    features: slice | None = None,
    d_features: int | None = None,
) -> None:
    """Set b_enc so that on `x_batch` each layer has `target_l0` active features per token.

    Every feature gets (nearly) the same firing rate q = target_l0 / d_features, clamped to
    (0, 1]: with B tokens, round(min(target_l0, d_features) * B) activations are spread over the
    d_features features of a layer as evenly as possible (k_f = floor or ceil of q B; which
    features get the extra one is random), and b_enc[l, f] = theta[l, f] - cut where `cut`
    lies midway between the k_f-th and (k_f + 1)-th largest of x[:, l] @ W_enc[l, :, f].
    So on this batch the mean L0 per layer equals target_l0 exactly (bar ties), and on
    other batches of the same distribution it is close. target_l0 >= d_features turns every
    feature on for every token of the batch. (With fewer than d_features / target_l0 tokens some
    features get k_f = 0 and start silent on this batch: pass a batch of a few thousand tokens.)
    A feature shard passes `features` (its slice of the `d_features` features per layer) and the
    same generator state as every other rank: it gets exactly its slice of the full CLT's b_enc.
    """
    if target_l0 <= 0:
        raise ValueError(f"target_l0 must be positive, got {target_l0}")
    batch, n_layers, _ = x_batch.shape
    d_features = d_features or model.d_features
    features = features or slice(0, d_features)
    x_batch = x_batch.to(device=model.W_enc.device, dtype=model.W_enc.dtype)
    theta = model.log_threshold.exp()
    total = round(min(float(target_l0), float(d_features)) * batch)  # activations per layer
    total = max(total, 1)
    base, extra = divmod(total, d_features)
    for layer in range(n_layers):
        counts = torch.full((d_features,), base, dtype=torch.long, device=x_batch.device)
        if extra:
            lucky = torch.randperm(d_features, generator=generator, device="cpu")[:extra].to(x_batch.device)
            counts[lucky] += 1
        counts = counts[features]
        h0 = x_batch[:, layer] @ model.W_enc[layer]  # [B, F] pre-activations without the bias
        ordered = h0.sort(dim=0, descending=True).values  # [B, F]
        spread = (ordered[0] - ordered[-1]).abs().clamp_min(1.0)
        kth = ordered.gather(0, (counts - 1).clamp(0, batch - 1)[None]).squeeze(0)  # k-th largest
        nxt = ordered.gather(0, counts.clamp(0, batch - 1)[None]).squeeze(0)  # (k+1)-th largest
        cut = torch.where(counts >= batch, ordered[-1] - spread, 0.5 * (kth + nxt))
        cut = torch.where(counts <= 0, ordered[0] + spread, cut)
        model.b_enc[layer] = theta[layer] - cut
