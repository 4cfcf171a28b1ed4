"""Model loading and the MLP input/output reader, on the tiny and the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from clt_forge import load_model, mlp_activations
from clt_forge.errors import CLTError
from clt_forge.models.activations import window_activations


def check_mlp_round_trip(model, tokens, atol):
    inputs, outputs = mlp_activations(model, tokens)
    assert inputs.shape == (*tokens.shape, model.cfg.n_layers, model.cfg.d_model)
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            torch.testing.assert_close(block.mlp(inputs[:, :, layer]), outputs[:, :, layer], atol=atol, rtol=0)
    return inputs, outputs


def test_tiny_mlp_inputs_give_mlp_outputs(tiny_model):
    tokens = torch.randint(0, 256, (2, 16))
    inputs, _ = check_mlp_round_trip(tiny_model, tokens, atol=1e-5)
    # The input is post-norm WITH the ln2 gain: x/rms(x) * w, not TransformerLens's hook_normalized.
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("ln2.hook_normalized"))
    for layer in range(tiny_model.cfg.n_layers):
        expected = cache[f"blocks.{layer}.ln2.hook_normalized"] * tiny_model.blocks[layer].ln2.w
        torch.testing.assert_close(inputs[:, :, layer], expected, atol=1e-5, rtol=1e-5)


def test_unknown_model_lists_configured_models():
    with pytest.raises(CLTError) as err:
        load_model("nope")
    for name in ("gpt2", "smollm2_135m", "tiny", "llama1b"):
        assert name in str(err.value)


@pytest.mark.slow
def test_embedded_model_matches_hf_logits_and_mlp_round_trip(smollm2):
    from clt_forge.models.gguf import load_hf
    from clt_forge.models.loading import model_config

    hf_model, tokenizer = load_hf(model_config("smollm2_135m"))
    tokens = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf_model(tokens).logits - smollm2(tokens)).abs().max().item()
    assert diff <= 1e-3
    check_mlp_round_trip(smollm2, tokens, atol=1e-4)


@pytest.mark.slow
def test_embedded_model_eos_is_im_end(smollm2):
    assert smollm2.tokenizer.eos_token == "<|im_end|>"
    assert smollm2.tokenizer.eos_token_id == 2


@pytest.mark.slow
def test_embedded_model_predicts_paris_offline_in_a_fresh_process():
    code = (
        "import torch; from clt_forge import load_model; m = load_model('smollm2_135m'); "
        "t = m.tokenizer('The capital of France is', return_tensors='pt').input_ids; "
        "p = m(t)[0, -1].softmax(-1); print(float(p.max())); print(repr(m.tokenizer.decode(p.argmax())))"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k in ("HOME", "CLT_FORGE_CACHE", "XDG_CACHE_HOME")})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    prob, token = result.stdout.strip().splitlines()[-2:]
    assert token == "' Paris'"
    assert float(prob) > 0.5


def test_window_activations_write_into_given_buffers_and_refuse_small_ones(tiny_model):
    windows = torch.randint(1, tiny_model.cfg.d_vocab, (5, 9))
    tokens, fresh_in, fresh_out = window_activations(tiny_model, windows, skip_first=True, batch_size=2)
    inputs, outputs = mlp_activations(tiny_model, windows)
    assert torch.equal(tokens, windows[:, 1:].flatten())
    torch.testing.assert_close(fresh_in, inputs[:, 1:].flatten(0, 1))
    torch.testing.assert_close(fresh_out, outputs[:, 1:].flatten(0, 1))
    size = fresh_in.numel()
    buffers = (torch.full((size + 7,), float("nan")), torch.full((size + 7,), float("nan")))
    _, into_in, into_out = window_activations(tiny_model, windows, True, 2, out=buffers)
    assert into_in.data_ptr() == buffers[0].data_ptr() and into_out.data_ptr() == buffers[1].data_ptr()
    assert torch.equal(into_in, fresh_in) and torch.equal(into_out, fresh_out)
    with pytest.raises(ValueError, match=f"fewer than the {size} values"):
        window_activations(tiny_model, windows, True, 2, out=(buffers[0], torch.empty(size - 1)))
