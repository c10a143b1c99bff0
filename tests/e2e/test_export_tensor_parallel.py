"""`kiln export --tp 2`: weights pre-sharded into one file per rank, loaded by two real worker
processes (gloo) that each read only their own file, against the source checkpoint in one
process. Tiny random checkpoints as in test_tensor_parallel.py: Llama with GQA, an MLP that
splits unevenly and an untied head, and Qwen2 (q/k/v bias, tied head).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open
from test_tensor_parallel import CONFIGS as TP_CONFIGS
from test_tensor_parallel import VOCAB, _prompts, _save_checkpoint

from kiln import LLM, SamplingParams
from kiln.cli.main import main
from kiln.config import ConfigError, ModelConfig
from kiln.engine.multiproc_executor import MultiprocExecutor
from kiln.errors import ModelLoadError
from kiln.export.manifest import FILES_MANIFEST, WEIGHTS_FILE, files_sha256
from kiln.export.reader import open_artifact
from kiln.export.registry import pull, push
from kiln.export.writer import ExportOptions, export_artifact
from kiln.parallel.group import TensorParallelGroup
from kiln.plan import Workload, local_cpu, make_plan, memory_per_rank
from tp_probes import packed_logits

CONFIGS = {name: TP_CONFIGS[name] for name in ("llama-gqa", "qwen2")}
OPTIONS = dict(device="cpu", kv_cache_memory=8 << 20, max_num_batched_tokens=24)
EXPORT = ["--batch-size", "4", "--sequence-length", "128", "--dtype", "fp32"]


def _export(source: Path, output: Path, *extra: str) -> Path:
    """Through the CLI's own entry point (in process: a subprocess would double the time)."""
    assert main(["export", "--model", str(source), "-o", str(output), *EXPORT, *extra]) == 0
    return output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: _save_checkpoint(config, tmp_path_factory.mktemp(name))
        for name, config in CONFIGS.items()
    }


@pytest.fixture(scope="module")
def artifacts(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("exported")
    return {
        name: _export(path, root / f"{name}-tp2", "--tp", "2") for name, path in checkpoints.items()
    }


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], artifacts: dict[str, Path]
) -> Iterator[tuple[LLM, LLM]]:
    """The source checkpoint in one process, and its tp=2 artifact loaded with no --tp (the
    artifact's degree is adopted)."""
    single = LLM(str(checkpoints[request.param]), dtype="float32", **OPTIONS)
    parallel = LLM(str(artifacts[request.param]), **OPTIONS)
    yield single, parallel
    parallel.shutdown()


def test_artifact_ranks_match_the_checkpoint_in_one_process(pair: tuple[LLM, LLM]) -> None:
    """Same greedy tokens for a batch, and every position's logits within 1e-4 on each rank."""
    single, parallel = pair
    executor = parallel.engine.executor
    assert isinstance(executor, MultiprocExecutor) and len(executor.pids) == 2
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, min_new_tokens=12)
    expected = single.generate(_prompts(), greedy)
    got = parallel.generate(_prompts(), greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    prompts = _prompts()[:2]
    want = packed_logits(single.engine.runner, prompts)
    for rank in executor.collective_rpc(packed_logits, prompts):
        assert (rank["logits"] - want["logits"]).abs().max().item() <= 1e-4
        assert rank["embedding_rows"] == VOCAB // 2
        assert rank["kv_cache_shape"][2] == want["kv_cache_shape"][2] // 2  # half the KV heads


def test_rank_files_hold_only_their_shard(
    checkpoints: dict[str, Path], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    artifact = artifacts["llama-gqa"]
    config = json.loads((artifact / "config.json").read_text())["kiln"]
    rank_files = ["kiln_model-rank-00-of-02.safetensors", "kiln_model-rank-01-of-02.safetensors"]
    assert (config["tp_degree"], config["rank_files"], config["quantization"]) == (
        2,
        rank_files,
        "none",
    )
    assert not (artifact / WEIGHTS_FILE).exists()
    listed = json.loads((artifact / FILES_MANIFEST).read_text())["files"]
    assert set(rank_files) <= set(listed)  # so the content id and a pull's checks cover them
    assert config["weights_sha256"] == files_sha256([artifact / name for name in rank_files])
    # q/k/v as the runtime layout fuses them: 4 heads of 16 -> 2 a rank, KV heads 2 -> 1.
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    shapes = {}
    for rank, name in enumerate(rank_files):
        with safe_open(str(artifact / name), framework="pt") as f:
            shapes[rank] = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    for rank in range(2):
        assert shapes[rank][qkv] == (2 * 16 + 1 * 16 + 1 * 16, 64)
        assert shapes[rank]["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
        assert shapes[rank]["model.embed_tokens.weight"] == (VOCAB // 2, 64)
        assert shapes[rank]["lm_head.weight"] == (VOCAB // 2, 64)
    gate_up = "model.layers.0.mlp.gate_up_proj.weight"
    assert (shapes[0][gate_up], shapes[1][gate_up]) == ((2 * 49, 64), (2 * 48, 64))
    # The whole model once (norms, a few KiB, are on every rank): ~ the tp=1 export's size.
    whole = _export(checkpoints["llama-gqa"], tmp_path / "tp1") / WEIGHTS_FILE
    ranks = sum((artifact / name).stat().st_size for name in rank_files)
    assert abs(ranks - whole.stat().st_size) / whole.stat().st_size < 0.02


def test_a_rank_reads_only_its_own_file(
    checkpoints: dict[str, Path], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 0 loads with the checkpoint and rank 1's file gone: nothing is re-sharded."""
    copy = tmp_path / "copy"
    shutil.copytree(artifacts["qwen2"], copy)
    (copy / "kiln_model-rank-01-of-02.safetensors").unlink()
    artifact = open_artifact(str(copy))
    assert artifact is not None
    config = ModelConfig.from_hf(json.loads((copy / "config.json").read_text()))
    model = artifact.build_rank_model(config, TensorParallelGroup(0, 2))
    attention = model.model.layers[0].self_attn
    assert (attention.num_heads, attention.num_kv_heads) == (2, 1)
    assert model.model.embed_tokens.weight.shape == (VOCAB // 2, 64)


def test_another_degree_is_refused_naming_both(
    checkpoints: dict[str, Path], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"exported for tp=2; tp=4 would need another export"):
        LLM(str(artifacts["llama-gqa"]), tp=4, **OPTIONS)
    one_rank = _export(checkpoints["llama-gqa"], tmp_path / "tp1")
    with pytest.raises(ConfigError, match=r"exported for tp=1; tp=2 would need another export"):
        LLM(str(one_rank), tp=2, **OPTIONS)


def test_export_refuses_bad_degrees_and_quantization(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both before a weight is read; nothing is left behind."""
    source = str(checkpoints["llama-gqa"])
    with pytest.raises(ConfigError, match=r"tp=3 does not divide .* valid degrees: 1, 2$"):
        export_artifact(source, tmp_path / "out", ExportOptions(1, 64, "fp32", tp_degree=3))
    with pytest.raises(ConfigError, match="--quantize int8 does not combine with --tp 2"):
        ExportOptions(1, 64, "fp32", quantize="int8", tp_degree=2)
    command = ["export", "--model", source, "-o", str(tmp_path / "out"), *EXPORT]
    assert main([*command, "--tp", "2", "--quantize", "int4"]) == 2
    assert "does not combine with --tp 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_rank_file_is_caught_at_pull_and_push(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    shutil.copytree(artifacts["llama-gqa"], source)
    rank_file = source / "kiln_model-rank-01-of-02.safetensors"
    data = bytearray(rank_file.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    rank_file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"rank-01-of-02\.safetensors: sha256 .* does not"):
        pull(str(source), tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    with pytest.raises(ModelLoadError, match=r"rank-01-of-02\.safetensors: sha256"):
        push(source, str(tmp_path / "registry"))


def test_plan_emits_the_export_line_for_the_smallest_fitting_degree(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A host whose memory holds one rank of two but not the whole model: the plan's export line
    says --tp 2, and runs as printed."""
    source = checkpoints["llama-gqa"]
    config = ModelConfig.from_hf(json.loads((source / "config.json").read_text()))
    workload = Workload(dtype="float32", batch_size=4, sequence_length=128)
    one, two = (memory_per_rank(config, workload, tp).total for tp in (1, 2))
    host = local_cpu((one + two) // 2, 2, "test")
    plan = make_plan(config, workload, model=str(source), catalogue=[host])
    (line,) = plan.export_commands
    assert (line.device, line.tp) == ("cpu", 2)
    words = shlex.split(line.command)
    assert words[:2] == ["kiln", "export"] and words[-2:] == ["--tp", "2"]
    words[words.index("-o") + 1] = str(tmp_path / "planned")
    assert main(words[1:]) == 0
    assert json.loads((tmp_path / "planned" / "config.json").read_text())["kiln"]["tp_degree"] == 2
