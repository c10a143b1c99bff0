"""Training checkpoints written atomically: a checkpoint directory exists complete or not at all.

A checkpoint is first written to a hidden temporary directory beside the others, flushed to
disk, then renamed to ``step-NNNNNNNN``; a crash (kill -9) mid-write leaves only a temporary
directory, which is never loaded and is cleared by the next save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from kiln.files import fsync_path

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"step-(\d{8})")
_TMP_PREFIX = ".tmp-"


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) as checkpoint ``step`` under
    ``root``, keeping the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP_PREFIX}step-{step:08d}"
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    fsync_path(tmp / STATE_FILE)
    fsync_path(tmp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(root)  # the rename itself reaches the disk
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint holds only plain data, so nothing in it can run code.
    return torch.load(path / STATE_FILE, weights_only=True)
