"""Shared set-up of the end-to-end tests; makes tests/server_harness.py and
tests/model_copies.py importable."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln import LLM
from model_copies import stories_with_extra_eos


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """Every end-to-end module runs tiny models (see ``one_torch_thread``); the CLI tests also
    run their subprocesses with ``--threads 1``, so both sides of a comparison do the same
    arithmetic."""


@pytest.fixture(scope="session")
def eos_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K with an EOS id that greedy decoding of EOS_PROMPT reaches."""
    stories = LLM(str(stories_dir), kv_cache_memory=16 << 20)
    return stories_with_extra_eos(stories_dir, tmp_path_factory.mktemp("stories_eos"), stories)
