"""Local registries: atomic push, verified pull, listing and the compatible-artifact lookup,
on real exported artifacts of stories260K."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.errors import ConfigError, ModelLoadError
from kiln.export import ExportOptions, export_artifact, list_artifacts, lookup, pull, push
from kiln.export.manifest import FILES_MANIFEST, WEIGHTS_FILE, artifact_id


@pytest.fixture(scope="module")
def artifacts(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    shapes = {"b1s64": (1, 64), "b4s64": (4, 64), "b4s256": (4, 256), "b8s128": (8, 128)}
    for name, (batch_size, sequence_length) in shapes.items():
        export_artifact(
            str(stories_dir), root / name, ExportOptions(batch_size, sequence_length, "fp32")
        )
    return {name: root / name for name in shapes}


def test_push_then_pull_gives_the_same_bytes(artifacts: dict[str, Path], tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    pushed = Path(push(artifacts["b1s64"], f"file://{registry}"))
    assert pushed.parent == registry and pushed.name.endswith(artifact_id(artifacts["b1s64"])[:12])
    assert push(artifacts["b1s64"], str(registry)) == str(pushed)  # same bytes again: no-op
    pulled = pull(str(pushed), tmp_path / "fresh")
    names = sorted(p.name for p in artifacts["b1s64"].iterdir())
    assert sorted(p.name for p in pulled.iterdir()) == names
    for name in names:
        assert (pulled / name).read_bytes() == (artifacts["b1s64"] / name).read_bytes()
    [entry] = list_artifacts(registry)
    assert entry.path == pushed and entry.artifact_id == artifact_id(pulled)
    assert entry.size == sum(p.stat().st_size for p in pulled.iterdir())


def test_corrupted_file_is_detected_on_pull(artifacts: dict[str, Path], tmp_path: Path) -> None:
    pushed = Path(push(artifacts["b1s64"], str(tmp_path / "art")))
    weights = pushed / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{WEIGHTS_FILE}: sha256 .* does not match"):
        pull(str(pushed), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # the staging copy is gone
    (pushed / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: missing"):
        pull(str(pushed), tmp_path / "fresh")


def test_push_refuses_a_corrupted_artifact(artifacts: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifacts["b1s64"], copy)
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ModelLoadError, match=r"tokenizer.json: .* bytes, the manifest says"):
        push(copy, str(tmp_path / "registry"))
    assert not (tmp_path / "registry").exists()


def test_interrupted_push_is_never_found(artifacts: dict[str, Path], tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    # What a push killed before its rename leaves: a hidden staging copy, partly written.
    partial = registry / ".stories-push-abc123"
    partial.mkdir()
    for name in ("config.json", FILES_MANIFEST):
        shutil.copy(artifacts["b1s64"] / name, partial / name)
    (partial / WEIGHTS_FILE).write_bytes((artifacts["b1s64"] / WEIGHTS_FILE).read_bytes()[:100])
    # A visible directory without its file list (copied by hand, half-way) is not offered either.
    by_hand = registry / "by-hand"
    by_hand.mkdir()
    shutil.copy(artifacts["b1s64"] / "config.json", by_hand / "config.json")
    assert list_artifacts(registry) == []
    manifest = json.loads((artifacts["b1s64"] / "config.json").read_text())["kiln"]
    assert lookup(registry, **_wanted(manifest, 1, 64)) is None
    pushed = push(artifacts["b1s64"], str(registry))
    assert [e.path for e in list_artifacts(registry)] == [Path(pushed)]


def test_push_onto_another_artifact_is_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "art"
    push(artifacts["b1s64"], str(target))
    with pytest.raises(ConfigError, match="already exists and holds something else"):
        push(artifacts["b4s64"], str(target))


def _wanted(manifest: dict, batch_size: int, sequence_length: int) -> dict:
    return {
        "source_sha256": manifest["source_sha256"],
        "dtype": "float32",
        "quantization": "source",
        "device": "cpu",
        "batch_size": batch_size,
        "sequence_length": sequence_length,
    }


def test_lookup_picks_the_smallest_compatible_artifact(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    for path in artifacts.values():
        push(path, str(registry))
    manifest = json.loads((artifacts["b1s64"] / "config.json").read_text())["kiln"]

    def found(batch_size: int, sequence_length: int) -> tuple[int, int] | None:
        entry = lookup(registry, **_wanted(manifest, batch_size, sequence_length))
        return (
            None if entry is None else (entry.manifest.batch_size, entry.manifest.sequence_length)
        )

    assert found(1, 32) == (1, 64)
    assert found(2, 64) == (4, 64)
    assert found(2, 100) == (4, 256)  # batch first: 4 < 8, then the sequence that fits
    assert found(5, 64) == (8, 128)
    assert found(9, 64) is None
    assert found(1, 512) is None
    assert lookup(registry, **{**_wanted(manifest, 1, 64), "dtype": "bfloat16"}) is None
    assert lookup(registry, **{**_wanted(manifest, 1, 64), "source_sha256": "0" * 64}) is None
    assert lookup(registry, **{**_wanted(manifest, 1, 64), "quantization": "int8"}) is None
