"""Export -> load round trips on stories260K: greedy tokens identical to the original model,
and quantized artifacts holding exactly the blocks in-memory quantization makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln import LLM, SamplingParams
from kiln.errors import ConfigError, ContextLengthError, ModelLoadError
from kiln.export import ExportOptions, export_artifact, read_manifest, verify_files
from kiln.export.manifest import WEIGHTS_FILE
from kiln.kernels.native import cpu_kernels

PROMPTS = ["Once upon a time", "The little dog ran"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
SEQ = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


def _greedy(llm: LLM) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


def _export(stories_dir: Path, out: Path, dtype: str, quantize: str | None = None) -> Path:
    export_artifact(str(stories_dir), out, ExportOptions(2, SEQ, dtype, quantize))
    return out


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp32", "float32"), ("bf16", "bfloat16")])
def test_float_round_trip_is_token_identical(
    stories_dir: Path, tmp_path: Path, dtype: str, torch_dtype: str
) -> None:
    artifact = _export(stories_dir, tmp_path / "a", dtype)
    original = LLM(str(stories_dir), device="cpu", dtype=torch_dtype, max_model_len=SEQ)
    loaded = LLM(str(artifact))
    assert loaded.dtype == getattr(torch, torch_dtype)
    assert loaded.max_model_len == SEQ
    assert _greedy(loaded) == _greedy(original)
    verify_files(artifact)  # the file list matches what was written


@pytest.mark.skipif(cpu_kernels() is None, reason="kiln's quantized CPU kernels cannot run here")
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_artifact_matches_in_memory_quantization(
    stories_dir: Path, tmp_path: Path, quantize: str
) -> None:
    artifact = _export(stories_dir, tmp_path / "q", "fp32", quantize)
    in_memory = LLM(str(stories_dir), device="cpu", dtype="float32", quantize=quantize)
    saved = load_file(str(artifact / WEIGHTS_FILE))
    layers = {n: m for n, m in in_memory.model.linear_layers().items() if m.bits is not None}
    manifest = read_manifest(artifact)
    assert manifest is not None and manifest.quantized_layers == {
        n: m.bits for n, m in layers.items()
    }
    assert layers  # stories260K's layers are all multiples of 32 wide
    for name, layer in layers.items():
        assert torch.equal(saved[f"{name}.qblocks"], layer.qblocks), name
    loaded = LLM(str(artifact))
    for name, layer in loaded.model.linear_layers().items():
        if name in layers:
            assert torch.equal(layer.qblocks, layers[name].qblocks), name
    assert _greedy(loaded) == _greedy(in_memory)


def test_input_beyond_exported_sequence_length_is_refused(
    stories_dir: Path, tmp_path: Path
) -> None:
    loaded = LLM(str(_export(stories_dir, tmp_path / "a", "fp32")))
    too_long = list(range(3, 3 + SEQ + 5))
    with pytest.raises(
        ContextLengthError,
        match=f"input length {SEQ + 5} exceeds the exported sequence length {SEQ}",
    ):
        loaded.generate([too_long], GREEDY)
    with pytest.raises(ContextLengthError, match="exceeds the exported sequence length"):
        loaded.generate([list(range(3, 3 + SEQ - 10))], GREEDY)  # + 24 new tokens
    with pytest.raises(ConfigError, match="exceeds the exported sequence length"):
        LLM(str(tmp_path / "a"), max_model_len=SEQ * 2)


def _edit_manifest(artifact: Path, **changes: str) -> None:
    config_file = artifact / "config.json"
    config = json.loads(config_file.read_text())
    config["kiln"].update(changes)
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"torch_version": "0.0.1"}, "exported for torch 0.0.1"),
        ({"kiln_version": "0.0.1"}, "exported for kiln 0.0.1"),
        ({"device": "cuda"}, "exported for device cuda"),
    ],
)
def test_other_version_or_device_is_refused_unless_allowed(
    stories_dir: Path, tmp_path: Path, changes: dict[str, str], message: str
) -> None:
    artifact = _export(stories_dir, tmp_path / "a", "fp32")
    expected = _greedy(LLM(str(artifact)))
    _edit_manifest(artifact, **changes)
    with pytest.raises(ModelLoadError, match=f"{message}.*--allow-recompile"):
        LLM(str(artifact), device="cpu")
    assert _greedy(LLM(str(artifact), device="cpu", allow_recompile=True)) == expected


def test_options_that_contradict_the_export_are_refused(stories_dir: Path, tmp_path: Path) -> None:
    artifact = _export(stories_dir, tmp_path / "a", "fp32")
    with pytest.raises(ConfigError, match="exported with dtype float32"):
        LLM(str(artifact), dtype="bfloat16")
    with pytest.raises(ConfigError, match="exported with quantization source"):
        LLM(str(artifact), quantize="int8")


def test_bad_export_options_are_refused(stories_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 is not supported on --device cpu"):
        ExportOptions(1, 64, "fp16")
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        ExportOptions(1, 64, "fp64")
    with pytest.raises(ConfigError, match="exceeds the model's maximum"):
        export_artifact(str(stories_dir), tmp_path / "x", ExportOptions(1, 4096, "fp32"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_artifact(str(stories_dir), tmp_path / "full", ExportOptions(1, 64, "fp32"))
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # no half-written export left


def test_tampered_weights_file_is_rejected_at_load(stories_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    artifact = _export(stories_dir, tmp_path / "a", "fp32")
    tensors = load_file(str(artifact / WEIGHTS_FILE))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(artifact / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"missing: \['model.norm.weight'\]"):
        LLM(str(artifact))


@pytest.mark.parametrize("fits", [True, False])
def test_weights_are_read_ahead_only_when_they_fit_in_memory(
    stories_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fits: bool
) -> None:
    from kiln.export import reader

    artifact = reader.open_artifact(str(_export(stories_dir, tmp_path / "a", "fp32")))
    assert artifact is not None
    size = artifact.rank_file(0).stat().st_size
    monkeypatch.setattr(reader, "available_memory", lambda: size * 2 if fits else size // 2)
    artifact.prefetch()
    # Read ahead: the weights file is mapped (and populated) already; not: nothing is mapped
    # until the model is built, and then pages fault in as they are used.
    assert (artifact.rank_file(0) in artifact._maps) is fits
    llm = LLM(str(artifact.path))
    assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
