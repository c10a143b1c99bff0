"""What an exported artifact is: the ``kiln`` section of its ``config.json`` and the list of its
files with their sha256, and the checks made before one is loaded.

An artifact directory holds a Hugging Face style ``config.json`` (so tools that read configs
still can) with an added ``kiln`` section, and ``kiln_files.json``, the sha256 and size of every
other file. The artifact's id is the sha256 of that file list: two artifacts with the same id
hold the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ModelLoadError

MANIFEST_KEY = "kiln"
"""The ``config.json`` key whose presence marks a directory as a kiln artifact."""
FILES_MANIFEST = "kiln_files.json"
WEIGHTS_FILE = "kiln_model.safetensors"
"""Not ``model.safetensors``: the tensors are in kiln's runtime layout (packed ``qblocks``),
which Hugging Face loaders would misread."""
RANK_WEIGHTS_FILE = "kiln_model-rank-{rank:02d}-of-{world_size:02d}.safetensors"
"""One tensor-parallel rank's part of the weights (an artifact exported with ``--tp N > 1``
holds N of these and no :data:`WEIGHTS_FILE`). Beside the other files, not in a folder: the
file list (:data:`FILES_MANIFEST`) and registries handle one flat directory."""
FORMAT_VERSION = 1
COMPILE_CACHE_NOTE = (
    "CPU: no compile cache is stored; kiln's quantized CPU kernels compile once per machine "
    "into ~/.cache/kiln/kernels (KILN_CACHE_DIR) on first use"
)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactManifest:
    """The ``kiln`` section of an artifact's ``config.json``."""

    batch_size: int
    """Most sequences run at once (the engine's ``max_num_seqs`` is capped by it)."""
    sequence_length: int
    """Most tokens (prompt + output) of one sequence: the engine's ``max_model_len``."""
    dtype: str
    """Floating-point weights' dtype: ``float32``, ``bfloat16`` or ``float16``."""
    quantization: str
    """What was asked: ``int8``, ``int4``, ``none``, or ``source`` (kept as the checkpoint
    stores it, e.g. a GGUF's 4-bit layers)."""
    quantized_layers: dict[str, int]
    """Bits of each linear layer stored as packed ``qblocks``, by module name."""
    tied_head_bits: int | None
    """Bits of the quantized copy of a head tied to the embedding (None: none)."""
    device: str
    """Device type the artifact is laid out for: ``cpu`` or ``cuda``."""
    tp_degree: int
    """Tensor-parallel ranks the weights are pre-sharded for (1: one whole-model file)."""
    kiln_version: str
    torch_version: str
    source: str
    """The checkpoint as the user named it (path, hub id, kiln's default model's name)."""
    source_path: str
    source_sha256: str
    """sha256 over the source checkpoint's weight files, in name order."""
    weights_sha256: str
    """sha256 of :data:`WEIGHTS_FILE`; with ``tp_degree > 1``, :func:`files_sha256` of the
    rank files."""
    rank_files: list[str] = field(default_factory=list)
    """With ``tp_degree > 1``: each rank's weights file (:data:`RANK_WEIGHTS_FILE`), in rank
    order; empty for one rank (a default, so artifacts written before TP export still read)."""
    embedding_from_head: bool = False
    """The embedding is looked up in the quantized tied head (``tied_head_bits``), which holds
    exactly its values, so the weights file has no float embedding matrix."""
    compile_cache: str = COMPILE_CACHE_NOTE
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> ArtifactManifest:
        if not isinstance(data, dict):
            raise ModelLoadError(f"{where}: the '{MANIFEST_KEY}' section is not a mapping")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(
                f"{where}: artifact format {data.get('format_version')!r} is not the one this "
                f"kiln reads ({FORMAT_VERSION}); export it again"
            )
        known = {f for f in cls.__dataclass_fields__}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise ModelLoadError(f"{where}: incomplete '{MANIFEST_KEY}' section ({e})") from None
        manifest.check_rank_files(where)
        return manifest

    def check_rank_files(self, where: str) -> None:
        """One safe file name per rank when the weights are pre-sharded, none otherwise."""
        if not isinstance(self.tp_degree, int) or self.tp_degree < 1:
            raise ModelLoadError(f"{where}: bad tp_degree {self.tp_degree!r}")
        expected = self.tp_degree if self.tp_degree > 1 else 0
        if not isinstance(self.rank_files, list) or len(self.rank_files) != expected:
            raise ModelLoadError(
                f"{where}: tp_degree {self.tp_degree} needs {expected} rank files, the manifest "
                f"lists {self.rank_files!r}"
            )
        for name in self.rank_files:
            # A name with a separator would read outside the artifact.
            if not isinstance(name, str) or not _is_plain_name(name):
                raise ModelLoadError(f"{where}: bad rank file name {name!r}")

    @property
    def weights_files(self) -> list[str]:
        """The files holding the weights: each rank's, in rank order, or the one file."""
        return list(self.rank_files) if self.tp_degree > 1 else [WEIGHTS_FILE]

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        """What must match for an artifact to serve a request for a model (shapes aside)."""
        return (self.source_sha256, self.dtype, self.quantization, self.tp_degree, self.device)


def read_manifest(path: Path) -> ArtifactManifest | None:
    """The manifest of the artifact at ``path``; None when ``path`` is not an artifact (not a
    directory, no ``config.json``, or one without a ``kiln`` section)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not ours to judge: the Hugging Face loader reports a broken config
    if not isinstance(config, dict) or MANIFEST_KEY not in config:
        return None
    return ArtifactManifest.from_json(config[MANIFEST_KEY], str(config_file))


def make_readable(directory: Path) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (mode 0700) and its files the modes a
    plain ``mkdir`` and ``open`` would have (umask applied): artifacts are shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One sha256 over several files: the hash of their names and hashes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def write_files_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Hash every file of ``directory`` (but the list itself) into :data:`FILES_MANIFEST`."""
    files = {
        p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != FILES_MANIFEST
    }
    (directory / FILES_MANIFEST).write_text(
        json.dumps({"files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return files


def read_files_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = Path(directory) / FILES_MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(
            f"{directory}: not a complete kiln artifact (no {FILES_MANIFEST})"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from None
    return parse_files_manifest(text, str(path))


def parse_files_manifest(text: str, where: str) -> dict[str, dict[str, Any]]:
    """The file list of a :data:`FILES_MANIFEST` read from ``where`` (a path or a URL)."""
    try:
        files = json.loads(text)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{where}: unreadable ({e})") from None
    for name in files:
        # A name with a separator could write or read outside the artifact on pull.
        if not _is_plain_name(name):
            raise ModelLoadError(f"{where}: bad file name {name!r}")
    return files


def _is_plain_name(name: str) -> bool:
    """A file name with no directory part: the artifact's files all sit in its directory."""
    return bool(name) and os.sep not in name and "/" not in name and name not in (".", "..")


def artifact_id(directory: Path) -> str:
    """sha256 of the artifact's file list (names, hashes, sizes): its content id."""
    return files_id(read_files_manifest(directory))


def files_id(files: dict[str, dict[str, Any]]) -> str:
    """:func:`artifact_id` of a file list already read (e.g. from a remote registry)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_files(directory: Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Check every file of ``directory`` against ``files`` (default: its own list): a missing
    file, or one whose size or sha256 differs, is a :class:`ModelLoadError` naming it."""
    directory = Path(directory)
    files = read_files_manifest(directory) if files is None else files
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing (listed in {FILES_MANIFEST})")
        if path.stat().st_size != entry["size"]:
            raise ModelLoadError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']} "
                "(truncated or corrupted)"
            )
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise ModelLoadError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's "
                f"{entry['sha256'][:16]}... (corrupted)"
            )
