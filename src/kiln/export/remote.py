"""Registries behind fsspec URLs (``memory://``, ``s3://``, ``gs://``, any protocol fsspec
knows): push, pull and list artifacts there with the local registry's guarantees.

Atomicity: a rename is atomic on a local disk, but on object stores fsspec's ``mv`` is a copy
then a delete, file by file, so "stage under a hidden name, then rename" could expose a
half-moved artifact. Here every push writes the artifact's files in place, ``config.json``
first (so a retried push recognizes the location as an artifact's, not a registry) and the
file list :data:`FILES_MANIFEST` LAST, each one object put. An artifact without its list is
incomplete: listing, lookups and pulls ignore or refuse it, and the next push to it replaces
it. Pulls download into a local temporary directory and check every file's sha256 there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, ModelLoadError
from kiln.export.manifest import (
    FILES_MANIFEST,
    MANIFEST_KEY,
    ArtifactManifest,
    files_id,
    parse_files_manifest,
    read_files_manifest,
)

_CONFIG = "config.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemotePath:
    """A location on an fsspec filesystem: the filesystem, its path there, and the URL prefix
    (``memory``, ``s3``...) that names it again (:attr:`url`)."""

    fs: Any  # fsspec.AbstractFileSystem; fsspec ships no type information
    path: str
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path.rstrip('/')}/{name}", self.scheme)


def resolve(url: str) -> RemotePath:
    """The filesystem and path of ``url``; an unknown protocol, or one whose fsspec backend
    (e.g. ``s3fs`` for ``s3://``) is not installed, is a :class:`ConfigError`."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{url}: not a registry kiln can open through fsspec ({e})") from None
    return RemotePath(fs, path.rstrip("/") or path, url.split("://", 1)[0])


def read_remote_artifact(
    location: RemotePath,
) -> tuple[ArtifactManifest, dict[str, dict[str, Any]]] | None:
    """The manifest and file list of a complete artifact at ``location``; None when there is
    none, or it is incomplete (no file list: a push still running or interrupted)."""
    files_text = _read_text(location.child(FILES_MANIFEST))
    config_text = _read_text(location.child(_CONFIG))
    if files_text is None or config_text is None:
        return None
    files = parse_files_manifest(files_text, location.child(FILES_MANIFEST).url)
    try:
        config = json.loads(config_text)
    except ValueError:
        return None
    if not isinstance(config, dict) or MANIFEST_KEY not in config:
        return None
    manifest = ArtifactManifest.from_json(config[MANIFEST_KEY], location.child(_CONFIG).url)
    return manifest, files


def list_remote(registry: RemotePath) -> Iterator[tuple[RemotePath, ArtifactManifest, str, int]]:
    """Each complete artifact of ``registry``: where, manifest, content id, bytes."""
    fs = registry.fs
    fs.invalidate_cache(registry.path)  # another process may have pushed since
    try:
        children = fs.ls(registry.path, detail=True)
    except FileNotFoundError:
        return
    for child in sorted(children, key=lambda c: c["name"]):
        location = RemotePath(fs, child["name"].rstrip("/"), registry.scheme)
        if child["type"] != "directory" or location.name.startswith("."):
            continue
        try:
            found = read_remote_artifact(location)
        except ModelLoadError:
            continue  # not a complete artifact: never offered
        if found is None:
            continue
        manifest, files = found
        size = sum(int(entry["size"]) for entry in files.values())
        size += fs.size(location.child(FILES_MANIFEST).path)
        yield location, manifest, files_id(files), size


def push_remote(artifact: Path, target: RemotePath, name: str, content_id: str) -> str:
    """Upload the (verified) artifact directory to ``target``: into it under ``name`` when it
    is a registry (an existing directory that is not an artifact's), else as the artifact's
    own location. Returns the artifact's URL."""
    fs = target.fs
    fs.invalidate_cache()
    if _is_registry(target):
        target = target.child(name)
    existing = read_remote_artifact(target)
    if existing is not None:
        if files_id(existing[1]) == content_id:
            return target.url  # the same bytes are already there
        raise ConfigError(f"{target.url}: already exists and holds something else; remove it first")
    if fs.exists(target.path):
        # An incomplete artifact (no file list): an interrupted push; replace it.
        fs.rm(target.path, recursive=True)
    files = read_files_manifest(artifact)
    # config.json first (see the module's note), the file list last: it marks completeness.
    order = [_CONFIG, *sorted(n for n in files if n != _CONFIG), FILES_MANIFEST]
    fs.makedirs(target.path, exist_ok=True)
    try:
        for file_name in order:
            upload_file(artifact / file_name, target.child(file_name))
    except BaseException:
        remove_incomplete(target)
        raise
    fs.invalidate_cache(target.path)
    return target.url


def upload_file(source: Path, destination: RemotePath) -> None:
    """Copy one local file to ``destination`` (one object put on object stores)."""
    with open(source, "rb") as fin, destination.fs.open(destination.path, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=_CHUNK)


def remove_incomplete(location: RemotePath) -> None:
    """Best effort: a push that failed removes what it wrote. A push killed outright cannot;
    its leftovers have no file list and are ignored (and replaced by the next push)."""
    with contextlib.suppress(OSError):
        location.fs.rm(location.path, recursive=True)


def download(source: RemotePath, destination: Path) -> dict[str, dict[str, Any]]:
    """Copy the complete artifact at ``source`` into the existing local ``destination``;
    returns its file list (the caller checks every file against it)."""
    source.fs.invalidate_cache(source.path)
    found = read_remote_artifact(source)
    if found is None:
        raise ModelLoadError(
            f"{source.url}: no complete kiln artifact there (no {FILES_MANIFEST} or no "
            f"{_CONFIG} with a '{MANIFEST_KEY}' section)"
        )
    _, files = found
    for file_name in [*sorted(files), FILES_MANIFEST]:
        remote = source.child(file_name)
        try:
            with source.fs.open(remote.path, "rb") as fin, open(destination / file_name, "wb") as f:
                shutil.copyfileobj(fin, f, length=_CHUNK)
        except FileNotFoundError:
            raise ModelLoadError(f"{remote.url}: missing (listed in {FILES_MANIFEST})") from None
    return files


def _is_registry(location: RemotePath) -> bool:
    """An existing directory that is not (even partly) an artifact."""
    fs = location.fs
    if not fs.isdir(location.path):
        return False
    return not (
        fs.exists(location.child(_CONFIG).path) or fs.exists(location.child(FILES_MANIFEST).path)
    )


def _read_text(location: RemotePath) -> str | None:
    try:
        return location.fs.cat_file(location.path).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{location.url}: unreadable ({e})") from None
