"""Artifact registries: push, pull, list and look up exported artifacts.

A local registry is a directory of artifact directories. A push copies into a hidden temporary
directory inside the registry, fsyncs every file and the directory, then renames it into place:
a rename within one filesystem is atomic, so a reader sees a whole artifact or none, and the
hidden leftovers of an interrupted push are never listed nor found. A pull copies into a hidden
temporary directory beside its destination, checks every file's sha256 against the artifact's
file list, then renames.

A Hugging Face hub repo id (``owner/name``) is pushed with ``upload_folder`` and pulled with
``snapshot_download`` (then verified the same way); the hub itself makes a push one commit.

Any other URL (``memory://``, ``s3://``, ``gs://``...) is a registry on an fsspec filesystem
(:mod:`kiln.export.remote`: files written in place, the file list last, as a completeness
marker, since a rename there is no atomic operation).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

import kiln
from kiln.errors import ConfigError, ModelLoadError
from kiln.export import remote
from kiln.export.manifest import (
    FILES_MANIFEST,
    ArtifactManifest,
    artifact_id,
    make_readable,
    read_files_manifest,
    read_manifest,
    verify_files,
)
from kiln.files import fsync_path
from kiln.kernels.native import cache_dir

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TEMP_PREFIX = "."  # hidden: never listed, never found


def default_registry() -> Path:
    """``$KILN_CACHE_DIR/artifacts`` or ``~/.cache/kiln/artifacts``."""
    return cache_dir() / "artifacts"


@dataclass(frozen=True)
class RegistryEntry:
    """One complete artifact of a registry."""

    path: Path | str
    """Its directory, or its URL in an fsspec registry (what :func:`pull` takes)."""
    manifest: ArtifactManifest
    artifact_id: str
    size: int
    """Bytes of all its files."""

    @property
    def name(self) -> str:
        """Its name in the registry (:func:`artifact_name`)."""
        return self.path.name if isinstance(self.path, Path) else remote.resolve(self.path).name


def artifact_name(manifest: ArtifactManifest, content_id: str) -> str:
    """The directory name an artifact gets in a registry: what it is, then its content id."""
    source = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(manifest.source).name or manifest.source)
    return (
        f"{source}-{manifest.dtype}-{manifest.quantization}-{manifest.device}"
        f"-tp{manifest.tp_degree}-b{manifest.batch_size}-s{manifest.sequence_length}"
        f"-{content_id[:12]}"
    )


def push(artifact: Path, target: str) -> str:
    """Push the artifact at ``artifact`` to ``target``; returns where it now is.

    ``target``: a hub repo id; or a local path, ``file://`` or fsspec URL: an existing
    directory that is not itself an artifact is a registry (the artifact goes in under
    :func:`artifact_name`, as ``cp`` copies into a directory), a path that does not exist is
    the artifact's own.
    """
    artifact = Path(artifact)
    manifest = _require_artifact(artifact)
    verify_files(artifact)  # never publish a corrupted copy
    if _is_fsspec_url(target):
        content_id = artifact_id(artifact)
        name = artifact_name(manifest, content_id)
        return remote.push_remote(artifact, remote.resolve(target), name, content_id)
    local = _local_path(target)
    if local is None:
        return _push_hub(artifact, target)
    content_id = artifact_id(artifact)
    if local.is_dir() and read_manifest(local) is None:
        local = local / artifact_name(manifest, content_id)
    if local.exists():
        return _already_there(local, content_id)
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{local.name}.push-", dir=local.parent))
    try:
        _copy_files(artifact, staging, read_files_manifest(artifact))
        make_readable(staging)
        try:
            staging.rename(local)
        except OSError:
            if local.exists():  # a concurrent push of the same name won the race
                return _already_there(local, content_id)
            raise
        fsync_path(local.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(local)


def pull(source: str, destination: Path) -> Path:
    """Copy the artifact at ``source`` (local path, ``file://`` or fsspec URL, or hub repo id)
    into the new directory ``destination``, every file checked against the artifact's sha256
    list; nothing is kept when one differs."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or not _is_empty(destination)):
        raise ConfigError(f"{destination}: already exists and is not an empty directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{destination.name}.pull-", dir=destination.parent)
    )
    try:
        local = None if _is_fsspec_url(source) else _local_path(source)
        if _is_fsspec_url(source):
            files = remote.download(remote.resolve(source), staging)
        elif local is None:
            _download_hub(source, staging)
            files = read_files_manifest(staging)
        else:
            _require_artifact(local)
            files = read_files_manifest(local)
            _copy_files(local, staging, files)
        _require_artifact(staging)
        # NOTE: hashes are computed on the copy, so a file corrupted at the source or on the way
        # is caught; the list itself comes from the source.
        verify_files(staging, files)
        make_readable(staging)
        if destination.exists():
            destination.rmdir()
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def list_artifacts(registry: Path | str) -> list[RegistryEntry]:
    """The complete artifacts of a registry (a directory, ``file://`` or fsspec URL), by name;
    hidden temporaries and artifacts without their file list are skipped."""
    if isinstance(registry, str):
        if _is_fsspec_url(registry):
            return [
                RegistryEntry(location.url, manifest, content_id, size)
                for location, manifest, content_id, size in remote.list_remote(
                    remote.resolve(registry)
                )
            ]
        local = _local_path(registry)
        registry = local if local is not None else Path(registry)
    registry = Path(registry)
    if not registry.is_dir():
        return []
    entries = []
    for path in sorted(registry.iterdir()):
        if path.name.startswith(_TEMP_PREFIX) or not path.is_dir():
            continue
        try:
            manifest = read_manifest(path)
            if manifest is None:
                continue
            files = read_files_manifest(path)
            content_id = artifact_id(path)
        except ModelLoadError:
            continue  # not a complete artifact: never offered
        size = sum(entry["size"] for entry in files.values())
        size += (path / FILES_MANIFEST).stat().st_size
        entries.append(RegistryEntry(path, manifest, content_id, size))
    return entries


def lookup(
    registry: Path | str,
    *,
    source_sha256: str,
    dtype: str,
    quantization: str,
    device: str,
    batch_size: int,
    sequence_length: int,
    tp_degree: int = 1,
) -> RegistryEntry | None:
    """A compatible artifact of ``registry``: same source weights, dtype, quantization, tp and
    device, made by this kiln and torch; the smallest batch size >= ``batch_size``, then the
    smallest sequence length >= ``sequence_length``. None if there is none."""
    wanted = (source_sha256, dtype, quantization, tp_degree, device)
    fits = [
        e
        for e in list_artifacts(registry)
        if e.manifest.key == wanted
        and e.manifest.kiln_version == kiln.__version__
        and e.manifest.torch_version == torch.__version__
        and e.manifest.batch_size >= batch_size
        and e.manifest.sequence_length >= sequence_length
    ]
    if not fits:
        return None
    return min(fits, key=lambda e: (e.manifest.batch_size, e.manifest.sequence_length))


# --- local copies -------------------------------------------------------------------------


def _copy_files(source: Path, destination: Path, files: dict[str, dict[str, object]]) -> None:
    """Copy the listed files and the list, each fsynced, then fsync the directory."""
    for name in [*sorted(files), FILES_MANIFEST]:
        src = source / name
        if not src.is_file():
            raise ModelLoadError(f"{src}: missing (listed in {FILES_MANIFEST})")
        with open(src, "rb") as fin, open(destination / name, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    fsync_path(destination)


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir())


def _already_there(path: Path, content_id: str) -> str:
    """A push onto an existing artifact is a no-op when it holds the same bytes."""
    if read_manifest(path) is not None and artifact_id(path) == content_id:
        return str(path)
    raise ConfigError(f"{path}: already exists and holds something else; remove it first")


def _require_artifact(path: Path) -> ArtifactManifest:
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such artifact directory")
    manifest = read_manifest(path)
    if manifest is None:
        raise ModelLoadError(f"{path}: not a kiln artifact (no config.json with a kiln section)")
    return manifest


def _is_fsspec_url(target: str) -> bool:
    """A URL for fsspec: any ``protocol://`` but ``file://``, which stays on the local path
    (fsynced files, atomic rename)."""
    return "://" in target and not target.startswith("file://")


def _local_path(target: str) -> Path | None:
    """The local path ``target`` names; None for a hub repo id."""
    if target.startswith("file://"):
        parsed = urllib.parse.urlparse(target)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{target}: only local file:// URLs are supported")
        return Path(urllib.parse.unquote(parsed.path))
    path = Path(target).expanduser()
    if path.exists() or target.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(target):
        return path
    return None


# --- Hugging Face hub (needs the network: not exercised by the offline tests) --------------


def _push_hub(artifact: Path, repo_id: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    files = read_files_manifest(artifact)
    # One commit: the hub shows either the old revision or the whole new one.
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(artifact),
        allow_patterns=[*files, FILES_MANIFEST],
        commit_message=f"kiln artifact {artifact_id(artifact)[:12]}",
    )
    return f"https://huggingface.co/{repo_id}"


def _download_hub(repo_id: str, destination: Path) -> None:
    from huggingface_hub import snapshot_download

    from kiln.weights.resolve import _hub_call

    _hub_call(repo_id, snapshot_download, repo_id, local_dir=str(destination))
    # huggingface_hub keeps its download bookkeeping there; not part of the artifact.
    shutil.rmtree(destination / ".cache", ignore_errors=True)
