"""Shared fixtures: small configs, the tiny model, and the embedded model (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    from clt_forge import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def smollm2():
    from clt_forge import load_model

    return load_model("smollm2_135m")
