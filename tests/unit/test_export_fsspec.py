"""Registries behind fsspec URLs: push, list, lookup and a verified pull through fsspec's
``memory://`` filesystem and its ``local://`` one (a local disk reached through fsspec's code
path; ``file://`` URLs keep kiln's own local path, with fsync and an atomic rename)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from kiln import LLM, SamplingParams
from kiln.errors import ConfigError, ModelLoadError
from kiln.export import ExportOptions, export_artifact, list_artifacts, lookup, pull, push, remote
from kiln.export.manifest import FILES_MANIFEST, WEIGHTS_FILE, artifact_id, read_manifest

SEQ = 64
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
PROMPTS = ["Once upon a time", "The little dog"]


@pytest.fixture(scope="module")
def artifact(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsspec") / "a"
    export_artifact(str(stories_dir), out, ExportOptions(1, SEQ, "fp32"))
    return out


@pytest.fixture(params=["memory", "local"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty registry URL on each filesystem."""
    if request.param == "memory":
        url = f"memory://kiln-test-{uuid.uuid4().hex}"
    else:
        url = f"local://{tmp_path / 'registry'}"
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    yield url
    fs.rm(path, recursive=True)


def _lookup(registry: str, artifact: Path) -> object:
    m = read_manifest(artifact)
    assert m is not None
    return lookup(
        registry,
        source_sha256=m.source_sha256,
        dtype=m.dtype,
        quantization=m.quantization,
        device=m.device,
        batch_size=1,
        sequence_length=SEQ,
    )


def _greedy(llm: LLM) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


def test_push_list_lookup_pull_and_load(
    artifact: Path, registry: str, stories_dir: Path, tmp_path: Path
) -> None:
    url = push(artifact, registry)
    assert url.startswith(registry.split("://")[0] + "://")
    assert url.endswith(artifact_id(artifact)[:12])
    assert push(artifact, registry) == url  # the same bytes again: a no-op
    [entry] = list_artifacts(registry)
    assert entry.path == url and entry.artifact_id == artifact_id(artifact)
    assert entry.name == url.rsplit("/", 1)[-1]
    assert entry.size == sum(p.stat().st_size for p in artifact.iterdir())
    found = _lookup(registry, artifact)
    assert found is not None and found.path == url  # type: ignore[attr-defined]
    pulled = pull(url, tmp_path / "fresh")
    for p in artifact.iterdir():
        assert (pulled / p.name).read_bytes() == p.read_bytes()
    original = LLM(str(stories_dir), device="cpu", dtype="float32", max_model_len=SEQ)
    assert _greedy(LLM(str(pulled))) == _greedy(original)


def test_push_to_a_new_url_is_the_artifacts_own(
    artifact: Path, registry: str, tmp_path: Path
) -> None:
    url = push(artifact, f"{registry}/mine")
    assert url.endswith("/mine")
    pulled = pull(url, tmp_path / "fresh")
    assert artifact_id(pulled) == artifact_id(artifact)


def test_corrupted_remote_file_is_caught_at_pull(
    artifact: Path, registry: str, tmp_path: Path
) -> None:
    url = push(artifact, registry)
    location = remote.resolve(url).child(WEIGHTS_FILE)
    data = bytearray(location.fs.cat_file(location.path))
    data[-1] ^= 0xFF  # same size, one byte changed
    location.fs.pipe_file(location.path, bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{WEIGHTS_FILE}: sha256 .* does not match"):
        pull(url, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "registry"] == []  # no staging


@pytest.mark.parametrize("cleanup", [True, False], ids=["failed", "killed"])
def test_interrupted_push_leaves_nothing_listed_or_found(
    artifact: Path,
    registry: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cleanup: bool,
) -> None:
    real_upload = remote.upload_file
    uploaded: list[str] = []

    def failing_upload(source: Path, destination: remote.RemotePath) -> None:
        if len(uploaded) == 3:
            raise OSError("connection reset (simulated)")
        uploaded.append(source.name)
        real_upload(source, destination)

    monkeypatch.setattr(remote, "upload_file", failing_upload)
    if not cleanup:  # a process killed mid-push never gets to remove what it wrote
        monkeypatch.setattr(remote, "remove_incomplete", lambda location: None)
    with pytest.raises(OSError, match="simulated"):
        push(artifact, registry)
    assert FILES_MANIFEST not in uploaded
    assert list_artifacts(registry) == []
    assert _lookup(registry, artifact) is None
    name = f"{registry}/" + _artifact_dir_name(artifact)
    with pytest.raises(ModelLoadError, match="no complete kiln artifact"):
        pull(name, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    # The next push completes (replacing any leftovers).
    monkeypatch.setattr(remote, "upload_file", real_upload)
    url = push(artifact, registry)
    assert [e.path for e in list_artifacts(registry)] == [url]


def _artifact_dir_name(artifact: Path) -> str:
    from kiln.export.registry import artifact_name

    manifest = read_manifest(artifact)
    assert manifest is not None
    return artifact_name(manifest, artifact_id(artifact))


def test_unknown_protocol_is_a_config_error(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="through fsspec"):
        push(artifact, "nosuchprotocol-kiln://bucket/x")
    with pytest.raises(ConfigError, match="through fsspec"):
        list_artifacts("nosuchprotocol-kiln://bucket")
