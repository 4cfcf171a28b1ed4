"""Foreign CLT checkpoints read as our own (issue 20): circuit-tracer's on-disk CLT written by
circuit-tracer's own writer, the reference CLT-Forge library's clt_weights.safetensors (single
file and per rank, written here following docs/formats.md), hf:// offline, and the round trip
ours -> circuit-tracer format -> ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTTranscoder
from safetensors.torch import save_file

from clt_forge.artifacts.checkpoint import CheckpointInfo, load_checkpoint, read_info, save_checkpoint
from clt_forge.artifacts.normalization import Normalization
from clt_forge.attribution.convert import export_circuit_tracer, fold
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.errors import CLTError

L, D, F = 3, 8, 12


def raw_reconstruction(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our loaded CLT on raw inputs x [B, L, D]: (features, raw reconstruction), both [B, L, *]."""
    clt, norm, _ = load_checkpoint(folder)
    with torch.no_grad():
        out = clt(norm.inputs(x))
    return out.features, out.reconstruction * norm.out_scale[:, None]


def circuit_tracer_clt(activation: str = "jump_relu", seed: int = 0) -> CTTranscoder:
    torch.manual_seed(seed)
    ct = CTTranscoder(
        L, F, D, activation_function=activation, lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32
    )
    with torch.no_grad():
        for param in ct.parameters():
            param.normal_(0, 0.3)
        if activation == "jump_relu":
            ct.activation_function.threshold.uniform_(0.0, 0.4)
    return ct


def write_circuit_tracer(folder: Path, ct: CTTranscoder, input_hook: str = "hook_resid_mid") -> Path:
    ct.to_safetensors(str(folder))
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\n"
        "model_name: google/gemma-2-2b\n"
        f"feature_input_hook: {input_hook}\n"
        "feature_output_hook: hook_mlp_out\n"
    )
    return folder


@pytest.mark.parametrize("activation", ["jump_relu", "relu"])
def test_circuit_tracer_folder_loads_with_equal_features_and_reconstruction(tmp_path, activation):
    ct = circuit_tracer_clt(activation)
    folder = write_circuit_tracer(tmp_path / "ct", ct)
    x = torch.randn(16, L, D)
    with torch.no_grad():
        want_features = ct.encode(x.transpose(0, 1))  # [L, B, F]
        want = ct.decode(want_features.to_sparse())  # [L, B, D]
    (folder / "config.json").write_text('{"architectures": ["Gemma2ForCausalLM"]}')  # a hub repo's own, not ours
    features, recon = raw_reconstruction(folder, x)
    assert (want_features != 0).sum() > 0 and (want_features == 0).sum() > 0, (
        "the test needs active and inactive features"
    )
    torch.testing.assert_close(features.transpose(0, 1), want_features, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(recon.transpose(0, 1), want, rtol=1e-5, atol=1e-5)

    clt, norm, info = load_checkpoint(folder)
    for layer in range(L):
        torch.testing.assert_close(clt.decoder(layer), ct.W_dec[layer], rtol=0, atol=0)
    torch.testing.assert_close(clt.W_enc, ct.W_enc.transpose(1, 2), rtol=0, atol=0)
    assert torch.equal(norm.in_scale, torch.ones(L)) and torch.equal(norm.out_scale, torch.ones(L))
    assert info.format == "circuit-tracer/clt" and info.model == {"hf_name": "google/gemma-2-2b"}
    assert info.hooks["mlp_in"] == [f"blocks.{layer}.hook_resid_mid" for layer in range(L)]
    assert info.hooks["mlp_out"][2] == "blocks.2.hook_mlp_out"
    assert read_info(folder).architecture() == {"n_layers": L, "d_model": D, "d_features": F, "bandwidth": 1.0}
    if activation == "relu":
        assert torch.isneginf(clt.log_threshold).all(), "ReLU is JumpReLU with threshold exactly 0"
        assert "relu" in info.train["imported"]["activation"]


def test_partial_thresholds_negative_thresholds_and_other_kinds_are_refused(tmp_path):
    """(A skip connection in some layers only: tests/test_skip.py.)"""
    folder = write_circuit_tracer(tmp_path / "mixed", circuit_tracer_clt())
    keys = {"W_enc_1": torch.randn(F, D), "b_enc_1": torch.zeros(F), "b_dec_1": torch.zeros(D)}
    save_file(keys, folder / "W_enc_1.safetensors")  # layer 1 lost its threshold
    with pytest.raises(CLTError, match=r"W_enc_1\.safetensors has no threshold_1"):
        read_info(folder)

    folder = write_circuit_tracer(tmp_path / "negative", circuit_tracer_clt())
    save_file({**keys, "threshold_1": torch.full((F,), -0.5)}, folder / "W_enc_1.safetensors")
    with pytest.raises(CLTError, match="threshold is negative"):
        load_checkpoint(folder)

    folder = write_circuit_tracer(tmp_path / "set", circuit_tracer_clt())
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: a\nfeature_output_hook: b\n")
    with pytest.raises(CLTError, match="model_kind is 'transcoder_set'"):
        read_info(folder)
    (folder / "W_dec_2.safetensors").unlink()
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: a\nfeature_output_hook: b\n"
    )
    with pytest.raises(CLTError, match=r"W_dec_2\.safetensors is missing"):
        read_info(folder)


def assert_same_weights(got: CrossLayerTranscoder, want: CrossLayerTranscoder) -> None:
    """Bit-equal weights; the thresholds to within float32 rounding (the format stores theta, we log theta)."""
    for name, tensor in want.state_dict().items():
        tolerance = 1e-6 if name == "log_threshold" else 0.0
        torch.testing.assert_close(got.state_dict()[name], tensor, rtol=tolerance, atol=tolerance, msg=name)


def our_checkpoint(folder: Path, norm: Normalization, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(L, D, F, jumprelu_threshold=0.05)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.2)
        clt.log_threshold.add_(torch.randn_like(clt.log_threshold) * 0.3)
    hooks = {
        "mlp_in": [f"blocks.{i}.mlp.hook_in" for i in range(L)],
        "mlp_out": [f"blocks.{i}.mlp.hook_out" for i in range(L)],
    }
    info = CheckpointInfo(n_layers=L, d_model=D, d_features=F, bandwidth=1.0, model={"name": "test"}, hooks=hooks)
    return save_checkpoint(folder, clt, norm, info)


def test_round_trip_through_the_circuit_tracer_export(tmp_path):
    unit = Normalization(torch.ones(L), torch.ones(L))
    ours = our_checkpoint(tmp_path / "unit", unit)
    back = export_circuit_tracer(ours, tmp_path / "unit-ct")
    original, _, original_info = load_checkpoint(ours)
    imported, _, info = load_checkpoint(back)
    assert_same_weights(imported, original)
    assert info.hooks == original_info.hooks, "the export declares the hooks our CLT reads and writes"

    scaled = Normalization(torch.rand(L) * 3 + 0.2, torch.rand(L) * 3 + 0.2)
    ours = our_checkpoint(tmp_path / "scaled", scaled)
    back = export_circuit_tracer(ours, tmp_path / "scaled-ct")
    x = torch.randn(32, L, D) * 2
    want_features, want = raw_reconstruction(ours, x)
    features, got = raw_reconstruction(back, x)
    assert (want_features != 0).sum() > 0
    assert torch.equal(features != 0, want_features != 0), "the same features fire"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    clt, _, _ = load_checkpoint(back)
    folded = fold(*load_checkpoint(ours)[:2])
    torch.testing.assert_close(clt.W_enc, folded.W_enc.transpose(1, 2), rtol=0, atol=0)


# ---- the reference CLT-Forge library's checkpoints ---------------------------------------------


def reference_tensors(cross_layer: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint in the reference library's layout (docs/formats.md)."""
    torch.manual_seed(seed)
    rows = L * (L + 1) // 2 if cross_layer else L
    return {
        "W_enc": torch.randn(L, D, F) * 0.3,
        "b_enc": torch.randn(L, F) * 0.2,
        "log_threshold": torch.randn(L, F) * 0.3 - 2,
        "W_dec": torch.randn(rows, F, D) * 0.3,
        "b_dec": torch.randn(rows, D) * 0.2,
        "estimated_norm_scaling_factor_in": torch.rand(L) + 0.5,
        "estimated_norm_scaling_factor_out": torch.rand(L) + 0.5,
        "feature_count": torch.zeros(L, F, dtype=torch.long),
    }


def reference_forward(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference library's forward on raw x [B, L, D]: its encode / decode, written out."""
    x = x * t["estimated_norm_scaling_factor_in"].view(1, -1, 1)
    h = torch.einsum("bnd,ndk->bnk", x, t["W_enc"]) + t["b_enc"]
    z = h * (h > t["log_threshold"].exp())
    if t["W_dec"].shape[0] == L:
        out = torch.einsum("bnk,nkd->bnd", z, t["W_dec"]) + t["b_dec"]
    else:
        sources, targets = torch.triu_indices(L, L)
        contrib = torch.einsum("bkd,kdf->bkf", z.index_select(1, sources), t["W_dec"]) + t["b_dec"]
        out = torch.zeros(x.shape[0], L, D).index_add(1, targets, contrib)
    return z, out / t["estimated_norm_scaling_factor_out"].view(1, -1, 1)


def write_reference(folder: Path, tensors: dict[str, torch.Tensor], world: int = 1) -> Path:
    folder.mkdir(parents=True)
    (folder / "clt_cfg.json").write_text(
        json.dumps({"model_name": "gpt2", "d_in": D, "d_latent": F, "jumprelu_bandwidth": 0.5})
    )
    if world == 1:
        save_file(tensors, folder / "clt_weights.safetensors")
        return folder
    bounds = torch.linspace(0, F, world + 1).long().tolist()
    dims = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 1, "feature_count": 1}
    for rank in range(world):
        cut = slice(bounds[rank], bounds[rank + 1])
        part = {k: (v[(slice(None),) * dims[k] + (cut,)] if k in dims else v).contiguous() for k, v in tensors.items()}
        save_file(part, folder / f"clt_weights_rank{rank}.safetensors")
    return folder


@pytest.mark.parametrize(("cross_layer", "world"), [(True, 1), (True, 3), (False, 1)])
def test_reference_checkpoint_loads_with_equal_features_and_reconstruction(tmp_path, cross_layer, world):
    tensors = reference_tensors(cross_layer)
    folder = write_reference(tmp_path / "ref", tensors, world)
    x = torch.randn(16, L, D)
    want_features, want = reference_forward(tensors, x)
    features, recon = raw_reconstruction(folder, x)
    assert (want_features != 0).sum() > 0 and (want_features == 0).sum() > 0
    torch.testing.assert_close(features, want_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, want, rtol=1e-5, atol=1e-5)
    info = read_info(folder)
    assert info.format == "clt-forge-reference/clt" and info.d_features == F and info.bandwidth == 0.5
    assert info.model == {"hf_name": "gpt2"} and info.hooks["mlp_in"][1] == "blocks.1.ln2.hook_normalized"
    assert len(info.train["imported"]["files"]) == world


def test_reference_checkpoint_missing_rank_or_key_is_refused(tmp_path):
    folder = write_reference(tmp_path / "ranks", reference_tensors(), world=3)
    (folder / "clt_weights_rank1.safetensors").unlink()
    with pytest.raises(CLTError, match="rank 1 is missing"):
        read_info(folder)
    tensors = reference_tensors()
    del tensors["estimated_norm_scaling_factor_out"]
    folder = write_reference(tmp_path / "key", tensors)
    with pytest.raises(CLTError, match="estimated_norm_scaling_factor_out is missing"):
        load_checkpoint(folder)


# ---- hub and unknown folders -----------------------------------------------------------------


def test_hub_checkpoint_offline_names_the_repo_and_the_download_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLTError) as caught:
        read_info("hf://clt-forge-tests/not-a-published-clt@v2")
    message = str(caught.value)
    assert "clt-forge-tests/not-a-published-clt" in message and "offline" in message
    assert "huggingface-cli download clt-forge-tests/not-a-published-clt --revision v2" in message
    with pytest.raises(CLTError, match="hf://org/name"):
        read_info("hf://just-a-name")


def test_a_folder_of_no_known_format_says_what_was_looked_for(tmp_path):
    with pytest.raises(CLTError, match=r"config\.yaml.*clt_weights\.safetensors"):
        load_checkpoint(tmp_path)


# ---- declared hooks: checked against the model, kept by conversion and export -----------------


def test_a_mismatched_model_or_hook_is_refused_naming_both_sides(tmp_path):
    from types import SimpleNamespace

    from clt_forge.artifacts.checkpoint import check_model_matches

    folder = write_circuit_tracer(tmp_path / "ct", circuit_tracer_clt())
    info = read_info(folder)
    gemma = SimpleNamespace(name="gemma2_2b", hf_name="google/gemma-2-2b", d_model=D, n_layers=L)
    check_model_matches(info, folder, gemma)  # nothing declared by the model: only the shape and name
    check_model_matches(info, folder, SimpleNamespace(**vars(gemma), hook_in="hook_resid_mid", hook_out=None))
    with pytest.raises(CLTError, match=r"d_model: checkpoint 8, config 16"):
        check_model_matches(info, folder, SimpleNamespace(**{**vars(gemma), "d_model": 16}))
    with pytest.raises(CLTError, match=r"hf_name: checkpoint 'google/gemma-2-2b', config 'meta-llama/Llama-3.2-1B'"):
        check_model_matches(info, folder, SimpleNamespace(**{**vars(gemma), "hf_name": "meta-llama/Llama-3.2-1B"}))
    with pytest.raises(
        CLTError,
        match=r"blocks\.0\.hook_resid_mid .*model gemma2_2b declares blocks\.0\.mlp\.hook_in .*model\.hook_in=hook_resid_mid",
    ):
        check_model_matches(info, folder, SimpleNamespace(**vars(gemma), hook_in="mlp.hook_in"))
    with pytest.raises(CLTError, match=r"mlp_out at blocks\.0\.hook_mlp_out .*model\.hook_out=hook_mlp_out"):
        check_model_matches(info, folder, SimpleNamespace(**vars(gemma), hook_out="mlp.hook_out"))
    fed = {"mlp_in": [f"blocks.{layer}.mlp.hook_in" for layer in range(L)]}
    with pytest.raises(CLTError, match=r"the activations fed to it use blocks\.0\.mlp\.hook_in"):
        check_model_matches(info, folder, gemma, hooks=fed)


def test_conversion_and_export_keep_an_imported_clts_declared_hooks(tmp_path):
    from clt_forge.attribution.convert import to_circuit_tracer

    folder = write_circuit_tracer(tmp_path / "ct", circuit_tracer_clt(), input_hook="hook_resid_mid")
    converted = to_circuit_tracer(folder)
    assert (converted.feature_input_hook, converted.feature_output_hook) == ("hook_resid_mid", "hook_mlp_out")
    again = export_circuit_tracer(folder, tmp_path / "again")
    config = (again / "config.yaml").read_text()
    assert "feature_input_hook: hook_resid_mid" in config and "model_name: google/gemma-2-2b" in config
    first, _, info = load_checkpoint(folder)
    second, _, info_again = load_checkpoint(again)
    assert info_again.hooks == info.hooks and info_again.model == info.model
    assert_same_weights(second, first)


def test_attributing_an_imported_clt_equals_circuit_tracers_own_loader(tmp_path):
    """`clt attribute` on a circuit-tracer folder (reading hook_resid_mid) gives the graph
    circuit-tracer gives with its own load_clt on the same model: equal adjacency."""
    from circuit_tracer import attribute
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from clt_forge.attribution.replacement import replacement_model
    from clt_forge.attribution.runner import AttributionRunner, AttributionSettings
    from clt_forge.models.loading import load_model, model_config

    cfg = model_config("tiny")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    ct = CTTranscoder(cfg.n_layers, 96, cfg.d_model, "jump_relu", lazy_decoder=False, device=cpu, dtype=torch.float32)
    with torch.no_grad():
        ct.W_enc.normal_(0, cfg.d_model**-0.5)
        ct.b_enc.normal_(0, 0.2)
        ct.b_dec.normal_(0, 0.05)
        for decoder in ct.W_dec:
            decoder.normal_(0, 0.05)
        ct.activation_function.threshold.uniform_(0.0, 0.2)
    ct.to_safetensors(str(tmp_path / "ct"))
    (tmp_path / "ct" / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    runner = AttributionRunner(tmp_path / "ct", model_name="tiny", settings=AttributionSettings(verbose=False))
    ids = torch.tensor(runner.tokens('The opposite of "large" is "'))
    settings: dict[str, Any] = {
        "max_n_logits": 5,
        "desired_logit_prob": 0.9,
        "batch_size": 64,
        "max_feature_nodes": 128,
    }
    ours = attribute(ids, runner.model, verbose=False, **settings)
    own = load_clt(
        str(tmp_path / "ct"), "hook_resid_mid", "hook_mlp_out", lazy_decoder=False, device=cpu, dtype=torch.float32
    )
    theirs = attribute(ids, replacement_model(load_model("tiny"), own), verbose=False, **settings)
    assert runner.model.feature_input_hook == "hook_resid_mid", "the CLT's declared hook, not mlp.hook_in"
    assert len(ours.active_features) > 0, "the test needs active features"
    n_features = len(ours.selected_features)
    assert ours.adjacency_matrix[:n_features, :n_features].abs().sum() > 0, "feature-to-feature edges exist"
    assert torch.equal(ours.active_features, theirs.active_features)
    assert torch.equal(ours.selected_features, theirs.selected_features)
    torch.testing.assert_close(ours.adjacency_matrix, theirs.adjacency_matrix, rtol=1e-5, atol=1e-6)


def test_a_bfloat16_circuit_tracer_clt_is_read_as_float32(tmp_path):
    ct = circuit_tracer_clt().to(torch.bfloat16)
    folder = write_circuit_tracer(tmp_path / "bf16", ct)
    clt, _, _ = load_checkpoint(folder)
    assert clt.W_dec.dtype == torch.float32
    torch.testing.assert_close(clt.W_enc, ct.W_enc.float().transpose(1, 2), rtol=0, atol=0)
    for layer in range(L):
        torch.testing.assert_close(clt.decoder(layer), ct.W_dec[layer].float(), rtol=0, atol=0)


def test_an_imported_clts_model_is_the_configured_model_with_its_hub_name():
    from clt_forge.models.loading import recorded_model_config

    assert recorded_model_config({"hf_name": "meta-llama/Llama-3.2-1B"}).name == "llama1b"
    assert recorded_model_config({"hf_name": "google/gemma-2-2b"}).name == "gemma2_2b"
    with pytest.raises(CLTError, match=r"'org/unknown'.*conf/model/<name>.yaml"):
        recorded_model_config({"hf_name": "org/unknown"})


def test_an_imported_clt_naming_no_model_runs_on_the_configured_model_checked_against_it(tmp_path):
    """No model_name: autointerp / attribute take model= (here the default, smollm2_135m: 30 layers,
    d_model 576) and refuse it before any heavy work when the CLT (3 layers, d_model 8) does not fit;
    code that reads the record alone says what to add."""
    from clt_forge.models.loading import recorded_model_config

    folder = write_circuit_tracer(tmp_path / "ct", circuit_tracer_clt())
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("model_name: google/gemma-2-2b\n", ""))
    for stage in ("autointerp", "attribute"):
        run = subprocess.run(
            [sys.executable, "-m", "clt_forge", stage, f"checkpoint={folder}", f"out={tmp_path / stage}"],
            capture_output=True,
            text=True,
        )
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert "names no language model: using model=smollm2_135m" in run.stdout, run.stdout
        assert "d_model: checkpoint 8, config 576" in run.stderr and "n_layers: checkpoint 3" in run.stderr, run.stderr
    with pytest.raises(
        CLTError, match=r"records no language model.*model_name: <hub id>.*google/gemma-2-2b \(gemma2_2b\)"
    ):
        recorded_model_config({})
