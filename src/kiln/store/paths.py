"""Where the conversation store lives by default: the user's data directory."""

from __future__ import annotations

import os
from pathlib import Path


def default_chat_db() -> Path:
    """``$XDG_DATA_HOME/kiln/chat.sqlite3``, else ``~/.local/share/kiln/chat.sqlite3``
    (read when called, never at import)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "kiln" / "chat.sqlite3"
