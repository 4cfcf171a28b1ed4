"""The skip connection (clt.skip, W_skip): its term in the forward pass, training with it and
resuming, circuit-tracer's skip CLTs read as ours, and our skip CLTs exported to and attributed
by circuit-tracer with the same reconstruction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTTranscoder
from safetensors.torch import load_file, save_file

from clt_forge.artifacts.checkpoint import CheckpointInfo, has_skip, load_checkpoint, read_info, save_checkpoint
from clt_forge.artifacts.normalization import Normalization
from clt_forge.attribution.convert import export_circuit_tracer, to_circuit_tracer
from clt_forge.clt.init import init_clt
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.errors import CLTError

L, D, F = 3, 8, 12


def skip_clt(seed: int = 0) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(L, D, F, jumprelu_threshold=0.05, skip=True)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.2)
        assert clt.W_skip is not None
        clt.W_skip.normal_(0, 0.3)
    return clt


def ct_reconstruction(ct: CTTranscoder, x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's reconstruction [B, L, D] of raw inputs x [B, L, D], skip included (its
    own `forward` calls `decode` without the inputs its skip needs)."""
    raw = x.transpose(0, 1)
    return ct.decode(ct.encode(raw).to_sparse(), input_acts=raw).transpose(0, 1)


def test_skip_starts_at_zero_and_adds_x_times_w_skip_per_layer():
    clt = CrossLayerTranscoder(L, D, F, skip=True)
    init_clt(clt, generator=torch.Generator().manual_seed(0))
    assert clt.W_skip is not None and torch.equal(clt.W_skip, torch.zeros(L, D, D))
    plain = CrossLayerTranscoder(L, D, F)
    assert plain.W_skip is None and "W_skip" not in dict(plain.named_parameters())

    clt = skip_clt()
    x = torch.randn(5, L, D)
    out = clt(x)
    assert clt.W_skip is not None
    want = clt.decode(out.features) + torch.stack([x[:, layer] @ clt.W_skip[layer] for layer in range(L)], dim=1)
    torch.testing.assert_close(out.reconstruction, want, rtol=1e-5, atol=1e-5)
    out.reconstruction.square().sum().backward()
    assert clt.W_skip.grad is not None and clt.W_skip.grad.abs().sum() > 0


def test_circuit_tracer_skip_clt_reads_as_ours_and_partial_skip_is_refused(tmp_path):
    torch.manual_seed(0)
    ct = CTTranscoder(
        L,
        F,
        D,
        activation_function="jump_relu",
        skip_connection=True,
        lazy_decoder=False,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        for param in ct.parameters():
            param.normal_(0, 0.3)
        ct.activation_function.threshold.uniform_(0.0, 0.4)
    assert ct.W_skip is not None
    for in_encoder_file in (False, True):
        folder = tmp_path / f"ct-{in_encoder_file}"
        ct.to_safetensors(str(folder))
        (folder / "config.yaml").write_text(
            "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
        )
        for layer in range(L):
            if in_encoder_file:  # the key beside the encoder's
                path = folder / f"W_enc_{layer}.safetensors"
                save_file({**load_file(path), f"W_skip_{layer}": ct.W_skip[layer].detach()}, path)
            else:
                save_file({f"W_skip_{layer}": ct.W_skip[layer].detach()}, folder / f"W_skip_{layer}.safetensors")
        x = torch.randn(16, L, D)
        with torch.no_grad():
            want = ct_reconstruction(ct, x)
            clt, norm, info = load_checkpoint(folder)
            got = clt(norm.inputs(x)).reconstruction * norm.out_scale[:, None]
        assert has_skip(folder) and info.train["imported"]["skip"] is True
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        attached = to_circuit_tracer(folder)  # load_clt reads no skip: ours attaches it
        assert attached.skip_connection and attached.W_skip is not None
        torch.testing.assert_close(attached.W_skip, ct.W_skip, rtol=0, atol=0)

    (tmp_path / "ct-False" / "W_skip_1.safetensors").unlink()
    with pytest.raises(CLTError, match=r"layer 0 has a skip connection .* layer 1 has none"):
        read_info(tmp_path / "ct-False")
    bad = tmp_path / "ct-False" / "W_skip_1.safetensors"
    save_file({"W_skip_1": torch.zeros(D, D + 1)}, bad)
    with pytest.raises(CLTError, match=r"W_skip_1 is \[8, 9\]; expected \[8, 8\]"):
        load_checkpoint(tmp_path / "ct-False")


def our_skip_checkpoint(folder: Path) -> Path:
    hooks = {
        kind: [f"blocks.{i}.mlp.{part}" for i in range(L)]
        for kind, part in (("mlp_in", "hook_in"), ("mlp_out", "hook_out"))
    }
    info = CheckpointInfo(n_layers=L, d_model=D, d_features=F, bandwidth=1.0, model={"name": "test"}, hooks=hooks)
    norm = Normalization(torch.rand(L) * 3 + 0.2, torch.rand(L) * 3 + 0.2)
    return save_checkpoint(folder, skip_clt(), norm, info)


def test_export_and_conversion_keep_the_skip_in_raw_units(tmp_path):
    ours = our_skip_checkpoint(tmp_path / "ours")
    assert has_skip(ours)
    clt, norm, _ = load_checkpoint(ours)
    x = torch.randn(32, L, D) * 2
    with torch.no_grad():
        want = clt(norm.inputs(x)).reconstruction * norm.out_scale[:, None]
        in_memory = to_circuit_tracer(ours)
        assert in_memory.skip_connection
        torch.testing.assert_close(ct_reconstruction(in_memory, x), want, rtol=1e-5, atol=1e-5)

        exported = export_circuit_tracer(ours, tmp_path / "ct")
        assert sorted(p.name for p in exported.glob("W_skip_*")) == [f"W_skip_{i}.safetensors" for i in range(L)]
        back, back_norm, _ = load_checkpoint(exported)  # raw units: the scales are folded in
        got = back(back_norm.inputs(x)).reconstruction * back_norm.out_scale[:, None]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        from_disk = to_circuit_tracer(exported)
        torch.testing.assert_close(ct_reconstruction(from_disk, x), want, rtol=1e-5, atol=1e-5)
