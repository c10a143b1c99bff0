"""Group-wise quantization, kiln's native CPU kernels, and which layers a model quantizes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln import LLM, EngineArgs, SamplingParams
from kiln.errors import ConfigError
from kiln.kernels import native
from kiln.kernels.native import cpu_kernels
from kiln.models.layers.linear import Linear
from kiln.models.loader import _kernels_for
from kiln.models.quantization_plan import QuantizationPlan, plan_quantization
from kiln.models.registry import MODEL_REGISTRY
from kiln.quantization import GROUP_SIZE, quantize


@pytest.fixture(scope="module")
def kernels() -> native.CPUKernels:
    built = cpu_kernels()
    if built is None:
        pytest.fail("kiln's CPU kernels did not build here (x86-64 Linux, AVX2, gcc expected)")
    return built


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rounds_each_weight_to_the_nearest_level_of_its_group(bits):
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * torch.logspace(-3, 1, 48)[:, None]  # rows of many scales
    quantized = quantize(weight, bits)
    assert quantized.shape == (48, 128)
    assert quantized.scales.shape == (48, 128 // GROUP_SIZE)
    error = (quantized.dequantize() - weight).abs().unflatten(1, (-1, GROUP_SIZE))
    # Rounding to the nearest level errs by at most half a step (plus float slack).
    assert (error <= quantized.scales[..., None] * 0.5001 + 1e-7).all()
    levels = quantized.codes.float()
    assert levels.min() >= (0 if bits == 4 else -127) and levels.max() <= (15 if bits == 4 else 127)


def test_quantize_rejects_rows_not_made_of_whole_groups():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(torch.randn(4, 40), 4)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 64), 3)


def _quantized_layer(
    kernels: native.CPUKernels, weight: torch.Tensor, bits: int, bias: torch.Tensor | None
) -> Linear:
    """A fused two-shard layer, each shard loaded separately as the model loader does."""
    split = weight.shape[0] // 3
    layer = Linear(weight.shape[1], [split, weight.shape[0] - split], bias=bias is not None)
    if bias is not None:
        layer.bias.data.copy_(bias)
    layer.quantize_to(bits, kernels)
    layer.load_weight_rows(weight[:split], layer.shard_rows(0))
    layer.load_weight_rows(weight[split:], layer.shard_rows(1))
    layer.finish_loading()
    return layer


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 31, 32, 70])
def test_quantized_linear_matches_a_float_matmul_over_its_dequantized_weight(kernels, bits, rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 256), torch.randn(96)
    layer = _quantized_layer(kernels, weight, bits, bias)
    x = torch.randn(rows, 256)
    expected = F.linear(x, quantize(weight, bits).dequantize(), bias)
    out = layer(x)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    error = ((out - expected).norm() / expected.norm()).item()
    # Up to 4 rows, integer dot products over activations quantized to int16 per group of 32
    # (~1e-5 relative); 5-31 rows, each block dequantized into float registers; from 32, a
    # float matmul over the dequantized weight.
    assert error < 2e-4
    assert torch.equal(layer.dense_weight(), quantize(weight, bits).dequantize())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gets_the_same_bits_alone_and_in_a_small_batch(kernels, bits):
    """Up to 4 rows multiply on integers row by row: a decode's result must not depend on
    which other sequences share its step (batch invariance), down to the last bit."""
    torch.manual_seed(bits)
    layer = _quantized_layer(kernels, torch.randn(96, 288), bits, torch.randn(96))
    x = torch.randn(4, 288)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    for rows in (2, 3, 4):
        assert torch.equal(layer(x[:rows]), alone[:rows])


def test_quantized_linear_keeps_the_activation_dtype(kernels):
    torch.manual_seed(0)
    layer = _quantized_layer(kernels, torch.randn(64, 128), 4, None)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = layer(x.float())
    torch.testing.assert_close(out.float(), expected, rtol=0.01, atol=0.05)


def test_kernel_library_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    compiler = "gcc"
    first = native._build(native._SOURCE, compiler, native.cpu_flags())
    assert first.parent == tmp_path / "kernels" and first.exists()
    built_at = first.stat().st_mtime_ns
    assert native._build(native._SOURCE, compiler, native.cpu_flags()) == first
    assert first.stat().st_mtime_ns == built_at
    assert list(first.parent.iterdir()) == [first]  # no scratch left behind
    # Another CPU's flags name another file: a shared cache never hands over a foreign build.
    assert native._build(native._SOURCE, compiler, native.cpu_flags() | {"made_up_flag"}) != first


def test_float_checkpoint_plans(stories_dir: Path):
    llm = LLM(str(stories_dir), device="cpu", kv_cache_memory=1 << 20, quantize="none")
    model = MODEL_REGISTRY[llm.config.model_type](llm.config)  # as built, before loading
    assert not plan_quantization(model, None, {})  # float checkpoint, default: stays float
    assert not plan_quantization(model, "none", {})
    int4 = plan_quantization(model, "int4", {})
    # stories260K's MLP is 172 wide, not whole groups of 32: down_proj stays float.
    assert all(bits == 4 for bits in int4.layers.values())
    assert not any(name.endswith("down_proj") for name in int4.layers)
    assert len(int4.layers) == 3 * 5 and int4.tied_head == 8  # qkv, o, gate_up x 5 layers
    int8 = plan_quantization(model, "int8", {})
    assert set(int8.layers.values()) == {8} and int8.layers.keys() == int4.layers.keys()


def test_int4_model_generates_close_to_the_float_one(stories_dir: Path):
    dense = LLM(str(stories_dir), device="cpu", kv_cache_memory=1 << 20)
    int4 = LLM(str(stories_dir), device="cpu", kv_cache_memory=1 << 20, quantize="int4")
    layers = int4.model.linear_layers()
    assert layers["lm_head"].bits == 8
    assert layers["model.layers.0.self_attn.qkv_proj"].bits == 4
    prompt = dense.tokenizer.encode("Once upon a time")
    from prefill_logits import kiln_prefill_logits

    expected, got = kiln_prefill_logits(dense, prompt), kiln_prefill_logits(int4, prompt)
    # Same top token at most positions; 4-bit weights of a 260K-parameter model err visibly.
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement >= 0.6, agreement


def test_quantize_option_is_checked():
    with pytest.raises(ConfigError, match="quantize must be one of none, int8, int4"):
        EngineArgs(quantize="int3")


def test_quantizing_on_a_gpu_is_refused_and_a_gguf_is_dequantized_there():
    plan = QuantizationPlan(layers={"x": 4})
    with pytest.raises(ConfigError, match="CPU only"):
        _kernels_for(plan, "int4", torch.device("cuda"))
    assert _kernels_for(plan, None, torch.device("cuda")) is None


def test_without_the_kernels_weights_stay_float(stories_dir: Path, monkeypatch, caplog):
    monkeypatch.setenv("KILN_NATIVE_KERNELS", "0")
    cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            llm = LLM(str(stories_dir), device="cpu", kv_cache_memory=1 << 20, quantize="int4")
    finally:
        cpu_kernels.cache_clear()
    assert all(layer.bits is None for layer in llm.model.linear_layers().values())
    assert "floating point" in caplog.text


def test_a_failed_kernel_build_keeps_weights_float_and_says_why(
    stories_dir: Path, tmp_path, monkeypatch, caplog
):
    # A compiler that fails (as on a machine without a working gcc): no crash, float weights.
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            llm = LLM(str(stories_dir), device="cpu", kv_cache_memory=1 << 20, quantize="int8")
            answer = llm.generate("Once upon a time", SamplingParams(max_new_tokens=4))
    finally:
        cpu_kernels.cache_clear()
    assert all(layer.bits is None for layer in llm.model.linear_layers().values())
    assert len(answer[0].token_ids) == 4
    assert "could not build kiln's CPU kernels" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.parametrize("width", [1536, 13])  # whole vectors of 8, and a tail
def test_silu_mul_matches_torch_to_float_precision(kernels, width):
    torch.manual_seed(width)
    gate_up = torch.cat([torch.randn(7, 2 * width) * 6, torch.full((1, 2 * width), -50.0)])
    gate_up[0, :2] = torch.tensor([0.0, 80.0])
    out = kernels.silu_mul(gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert out.shape == (8, width)
    assert ((out.double() - expected).abs() <= 4e-7 * expected.abs() + 1e-30).all()
    # the same element gets the same bits in a full vector and in the padded tail
    assert torch.equal(
        kernels.silu_mul(gate_up[:, list(range(5)) + list(range(width, width + 5))]), out[:, :5]
    )
