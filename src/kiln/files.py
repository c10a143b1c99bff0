"""Small filesystem helpers shared by the parts that write directories atomically (exported
artifacts and their registry, training checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk. A directory is fsynced after a file is
    created or renamed in it: fsyncing the file alone does not make its name durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
