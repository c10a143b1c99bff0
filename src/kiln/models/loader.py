"""Build a kiln model from a Checkpoint: pick the class, the dtype and copy the weights in."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
from tqdm import tqdm

from kiln.config import ModelConfig
from kiln.errors import ConfigError, ModelLoadError
from kiln.kernels.native import CPUKernels, cpu_has_native_bf16, cpu_kernels
from kiln.models.base import CausalLM
from kiln.models.quantization_plan import QuantizationPlan, plan_quantization
from kiln.models.registry import MODEL_REGISTRY
from kiln.weights.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(
    requested: str,
    config: ModelConfig,
    device: torch.device,
    *,
    quantized: bool = False,
    native_bf16: bool | None = None,
) -> torch.dtype:
    """``auto`` follows config.json's ``torch_dtype`` (float32 when absent, as for GGUF), except
    on a CPU: there it is bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or
    AMX; ``native_bf16``, probed when None) and float32 elsewhere, and float32 for a quantized
    model, whose kernels compute in float32.

    float16 on CPU falls back to float32: CPU kernels for it are slow and some are missing.
    """
    if requested == "auto":
        name = config.torch_dtype or "float32"
        if name not in DTYPES:
            # The bad value is the checkpoint's, not the flag's: name the file and key it came
            # from, and the flag that overrides it.
            raise ModelLoadError(
                f"config.json: {config.torch_dtype_key} {name!r} is not supported; "
                "use --dtype float32, bfloat16 or float16"
            )
        if device.type == "cpu":
            if native_bf16 is None:
                native_bf16 = cpu_has_native_bf16()
            name = "bfloat16" if native_bf16 and not quantized else "float32"
    elif requested in DTYPES:
        name = requested
    else:
        raise ModelLoadError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("float16 is not supported well on CPU; using float32 instead")
        dtype = torch.float32
    return dtype


def _kernels_for(
    plan: QuantizationPlan, quantize: str | None, device: torch.device
) -> CPUKernels | None:
    if not plan:
        return None
    if device.type != "cpu":
        if quantize is not None:
            raise ConfigError(f"--quantize {quantize} runs on the CPU only; use --device cpu")
        return None  # a GGUF's quantized tensors are dequantized for the GPU
    kernels = cpu_kernels()
    if kernels is None:
        logger.warning(
            "kiln's quantized CPU kernels cannot run here (they need x86-64 Linux with AVX2 "
            "and a C compiler): weights are kept in floating point"
        )
    return kernels


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    checkpoint: Checkpoint,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    progress: bool = False,
    quantize: str | None = None,
    inference: bool = True,
) -> CausalLM:
    """Allocate the model directly in ``dtype`` on ``device`` and load the checkpoint's weights.

    ``quantize`` picks which linear layers keep group-quantized weights (see
    :mod:`kiln.models.quantization_plan`); on a GPU, or a CPU kiln's kernels cannot run on,
    weights are floats whatever it says.

    ``inference=False`` (fine-tuning) skips the inference-only layout changes (CPU packing
    releases the plain weights; buffers cannot be trained): parameters stay parameters.
    """
    model = allocate_model(config, dtype, device, max_positions)
    plan = plan_quantization(model, quantize, checkpoint.weight_formats)
    kernels = _kernels_for(plan, quantize, device)
    if kernels is None:
        plan = QuantizationPlan()
    model.quantize_linears(plan.layers, kernels)
    load = checkpoint.load_weights
    if plan and checkpoint.load_quantized_weights is not None:
        load = checkpoint.load_quantized_weights
    with torch.no_grad():
        weights = tqdm(
            load(),
            total=checkpoint.num_weights,
            desc="Loading weights",
            unit=" tensors",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        )
        model.load_weights(weights, source=str(checkpoint.path))
        if plan.tied_head is not None:
            model.quantize_tied_head(plan.tied_head, kernels)
            model.embed_from_head()
        model.quantized_sources.clear()
    if not inference:
        return model
    return prepare_for_inference(model, device)


def allocate_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int | None
) -> CausalLM:
    """The model's modules in ``dtype`` on ``device``: storage allocated, weights not loaded."""
    model_cls = MODEL_REGISTRY[config.model_type]
    with _default_dtype(dtype), device:
        return model_cls(config, max_positions=max_positions)


def prepare_for_inference(model: CausalLM, device: torch.device) -> CausalLM:
    """After loading: the inference-only layout (CPU packing, parameters as buffers)."""
    if device.type == "cpu":
        model.prepare_for_cpu()
    model.convert_parameters_to_buffers()
    return model.eval()
