"""Bring your own CLT (issue 20): `clt train finetune.from=<circuit-tracer folder> finetune.rank=R`
LoRA-finetunes a CLT clt-forge never normalised. The finetune keeps the imported normalisation
(circuit-tracer's factors are 1, docs/formats.md), so the adapters train in raw model units."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTTranscoder
from test_hooks import resid_dataset, train_config  # noqa: F401 (resid_dataset: a fixture)

from clt_forge.artifacts.activations import HELD_OUT, read_chunk, read_manifest
from clt_forge.artifacts.checkpoint import TRAINING_STATE, load_checkpoint
from clt_forge.artifacts.normalization import Normalization
from clt_forge.models.activations import hook_names
from clt_forge.models.loading import model_config
from clt_forge.training import CLTTrainingRunner

RANK = 2


def raw_tokens(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of a cached dataset folder (raw model units): x, y [N, L, D]."""
    manifest = read_manifest(folder)
    chunks = [read_chunk(folder, entry, manifest.quant_spec) for entry in manifest.chunks]
    return torch.cat([c.mlp_in for c in chunks]).float(), torch.cat([c.mlp_out for c in chunks]).float()


def split(packed: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """Our packed decoder [F, P, D] as circuit-tracer's per-source blocks W_dec_s [F, L - s, D]."""
    return list(packed.split(list(range(n_layers, 0, -1)), dim=1))


def decode(z: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """sum over sources s <= t of z_s W_dec[s -> t]: z [N, L, F], packed [F, P, D] -> [N, L, D]."""
    n_layers = z.shape[1]
    out = z.new_zeros(z.shape[0], n_layers, packed.shape[-1])
    for s, block in enumerate(split(packed, n_layers)):
        out[:, s:] += torch.einsum("nf,ftd->ntd", z[:, s], block)
    return out


def write_imported_clt(folder: Path, x: torch.Tensor, y: torch.Tensor, d_features: int = 48) -> Path:
    """A circuit-tracer CLT for tiny (hook_resid_mid -> hook_mlp_out), JumpReLU, written by
    circuit-tracer's own writer, in the raw units of the activations x, y [N, L, D]: a random
    encoder with pre-activations of order 1 (about a third of the features fire), the decoder and
    b_dec fitted to y by ridge regression (held-out EV about 0.55), then damaged by a rank-1
    error (a flaw a rank-2 LoRA can repair) that costs about half the variance."""
    cfg = model_config("tiny")
    L, D, F = cfg.n_layers, cfg.d_model, d_features
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    ct = CTTranscoder(L, F, D, "jump_relu", lazy_decoder=False, device=cpu, dtype=torch.float32)
    x_rms = x.pow(2).mean(dim=(0, 2)).sqrt()  # [L]
    with torch.no_grad():
        for layer in range(L):
            ct.W_enc[layer].normal_(0, 1 / (D**0.5 * x_rms[layer].item()))
        ct.b_enc.normal_(0, 0.2)
        ct.activation_function.threshold.uniform_(0.1, 0.6)
        z = ct.encode(x.transpose(0, 1)).transpose(0, 1).double()  # [N, L, F]
        fitted = []
        for target in range(L):  # y_t ~ z_{<=t} W_dec[. -> t] + b_dec_t, ridge
            inputs = torch.cat([z[:, : target + 1].flatten(1), torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
            gram = inputs.T @ inputs
            gram += 1e-2 * gram.diagonal().mean() * torch.eye(len(gram), dtype=z.dtype)
            solution = torch.linalg.solve(gram, inputs.T @ y[:, target].double())  # [(t+1) F + 1, D]
            ct.b_dec[target] = solution[-1].float()
            fitted.append(solution[:-1].view(target + 1, F, D))
        decoders = [torch.stack([fitted[t][s] for t in range(s, L)], dim=1) for s in range(L)]  # s: [F, L-s, D]
        damage = torch.randn(F, 1, dtype=z.dtype) @ torch.randn(1, L * (L + 1) // 2 * D, dtype=z.dtype)
        harm = decode(z, damage.view(F, -1, D))
        scale = ((y - y.mean(0)).pow(2).mean() / harm.pow(2).mean()).sqrt() * 0.7
        for s, damaged in enumerate(split(torch.cat(decoders, dim=1) + scale * damage.view(F, -1, D), L)):
            ct.W_dec[s].copy_(damaged.float())
    ct.to_safetensors(str(folder))
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


def explained_variance(folder: Path, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(MSE, explained variance, mean L0) of the checkpoint's CLT on raw x -> y, in raw units."""
    clt, norm, _ = load_checkpoint(folder)
    with torch.no_grad():
        out = clt(norm.inputs(x))
    recon = out.reconstruction * norm.out_scale[:, None]
    mse = (recon - y).pow(2).mean().item()
    variance = (y - y.mean(0)).pow(2).mean().item()
    l0 = (out.features != 0).float().sum(-1).mean().item()
    return mse, 1 - mse / variance, l0


def test_lora_finetune_of_an_imported_circuit_tracer_clt_trains_in_raw_units(resid_dataset, tmp_path):  # noqa: F811
    x_train, y_train = raw_tokens(resid_dataset)
    x, y = raw_tokens(resid_dataset / HELD_OUT)
    source = write_imported_clt(tmp_path / "ct", x_train, y_train)
    imported, imported_norm, imported_info = load_checkpoint(source)
    assert imported_info.format == "circuit-tracer/clt" and imported_norm.in_scale.eq(1).all()
    mse_before, ev_before, l0_before = explained_variance(source, x, y)
    assert 1 < l0_before < imported.d_features - 1, "the test needs active and inactive features"

    # raw units (tiny's hook_mlp_out rms is ~3e-3): Adam's step and lambda0 are set for that scale
    raw_units = ["optim.lr=1e-3", "optim.lr_warmup_fraction=0.1", "sparsity.l0_coefficient=1e-3"]
    finetune = [f"finetune.source={source}", f"finetune.rank={RANK}"]
    other_width = "clt.jumprelu_bandwidth=0.5"  # the run's default for new CLTs: a finetune keeps its source's
    cfg = train_config(
        tmp_path / "tuned", f"activations={resid_dataset}", *finetune, "tokens=6000", other_width, *raw_units
    )
    assert cfg.clt.d_features == 32 != imported.d_features, "the command line asks for another width"
    run = CLTTrainingRunner(cfg).run()
    final = run / "checkpoints" / "final"
    tuned, norm, info = load_checkpoint(final)

    # the run used the hooks and the units the imported CLT declares
    assert info.hooks == hook_names(3, "hook_resid_mid", "hook_mlp_out")
    assert info.bandwidth == imported_info.bandwidth == tuned.bandwidth != 0.5, "the STE width it trained with"
    assert (info.model["hook_in"], info.model["hook_out"]) == ("hook_resid_mid", "hook_mlp_out")
    # the recorded configs say the width and STE bandwidth trained (the checkpoint's), not clt.*'s 32 and 0.5
    recorded = json.loads((run / "train_config.json").read_text())["clt"]
    for clt_cfg in (recorded, info.train["clt"]):
        assert (clt_cfg["d_features"], clt_cfg["jumprelu_bandwidth"]) == (imported.d_features, info.bandwidth)
    assert torch.equal(norm.in_scale, torch.ones(3)) and torch.equal(norm.out_scale, torch.ones(3)), (
        "finetune keeps circuit-tracer's normalisation (factors 1), not the dataset's"
    )
    dataset_norm = Normalization.from_manifest(read_manifest(resid_dataset), cfg.normalization)
    assert (dataset_norm.in_scale - 1).abs().min() > 0.5, "the dataset's own factors are far from 1"

    # only the adapters trained: the frozen weights are the imported ones, bit for bit
    for name in ("b_enc", "b_dec", "log_threshold"):
        assert torch.equal(getattr(tuned, name), getattr(imported, name)), name
    adapters = torch.load(final / TRAINING_STATE, weights_only=False)["trainable"]
    A, B = adapters["parametrizations.W_enc.0.A"], adapters["parametrizations.W_enc.0.B"]
    U, V = adapters["parametrizations.W_dec.0.U"], adapters["parametrizations.W_dec.0.V"]
    assert A.shape[-1] == RANK and U.shape[-1] == RANK
    assert B.abs().max() > 1e-4 and V.abs().max() > 1e-4, "the adapters (zero at the start) changed"
    assert torch.equal(tuned.W_enc, imported.W_enc + torch.bmm(A, B)), "merged = the imported encoder + A B"
    assert torch.equal(tuned.W_dec, imported.W_dec + (U @ V).view_as(imported.W_dec)), "merged = imported + U V"

    # and they learned: a better reconstruction of held-out tokens, in raw model units
    mse_after, ev_after, l0_after = explained_variance(final, x, y)
    print(f"held-out EV {ev_before:.3f} -> {ev_after:.3f}, MSE {mse_before:.3g} -> {mse_after:.3g}, L0 {l0_after:.1f}")
    assert mse_after < 0.8 * mse_before and ev_after > ev_before + 0.2
