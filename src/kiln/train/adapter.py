"""Load a saved LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's
layout, as ``kiln finetune`` writes it) onto a loaded model without merging it: the base
weights stay as they are (quantized or packed for serving included) and each adapted layer
adds ``scaling * B A x``. Serving, ``kiln finetune eval`` and ``LLM(model, adapter=...)`` use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kiln.errors import ModelLoadError
from kiln.models.base import CausalLM
from kiln.train.lora import TARGET_MODULES, LoRAConfig, LoRALinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def read_adapter_config(path: Path) -> LoRAConfig:
    """The adapter's rank and alpha (dropout 0: an adapter loaded here is never trained)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a LoRA adapter directory ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{path}: a {config['peft_type']} adapter; only LoRA is supported")
    # Variants that change the update's formula: refused rather than served wrongly.
    for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ModelLoadError(f"{path}: {key} adapters are not supported")
    try:
        return LoRAConfig(
            r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=0.0,
            target_modules=TARGET_MODULES,
        )  # fmt: skip
    except KeyError as e:
        raise ModelLoadError(f"{path}/{CONFIG_FILE}: no {e.args[0]!r}") from None


def load_adapter(model: CausalLM, path: str | Path) -> int:
    """Wrap every linear layer the adapter has weights for in a :class:`LoRALinear` holding
    them, in the model's dtype and on its device. Returns the number of adapted projections.

    Every tensor of the adapter must find its layer, with the right shape: an adapter made for
    another model is an error, not a silent partial load.
    """
    path = Path(path)
    config = read_adapter_config(path)
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (OSError, RuntimeError) as e:
        raise ModelLoadError(f"{path}/{WEIGHTS_FILE}: {e}") from None
    # The embedding is never quantized or packed: its dtype is the one the model computes in.
    embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    dtype, device = embedding.weight.dtype, embedding.weight.device
    unused = set(weights)
    adapted = 0
    for layer_name, layer in model.linear_layers().items():
        present = {
            proj: (hf_name, shard)
            for proj, (hf_name, shard) in model.hf_projections(layer_name).items()
            if f"{_PREFIX}{hf_name}.lora_A.weight" in weights
        }
        if not present:
            continue
        shards = {proj: shard for proj, (_, shard) in present.items()}
        wrapper = LoRALinear(layer, shards, config, dtype=dtype)
        # NOTE: only the new matrices move: the base layer may hold oneDNN-packed weights.
        wrapper.lora_a.to(device)
        wrapper.lora_b.to(device)
        for proj, (hf_name, _) in present.items():
            for matrix, params in (("A", wrapper.lora_a), ("B", wrapper.lora_b)):
                key = f"{_PREFIX}{hf_name}.lora_{matrix}.weight"
                if key not in weights:
                    raise ModelLoadError(f"{path}: {key} is missing")
                if weights[key].shape != params[proj].shape:
                    raise ModelLoadError(
                        f"{path}: {key} is {tuple(weights[key].shape)}, this model needs "
                        f"{tuple(params[proj].shape)} (an adapter for another model?)"
                    )
                with torch.no_grad():
                    params[proj].copy_(weights[key])
                params[proj].requires_grad_(False)
                unused.discard(key)
                adapted += 1 if matrix == "A" else 0
        parent_name, _, attr = layer_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, wrapper)
    if unused:
        raise ModelLoadError(
            f"{path}: {len(unused)} adapter tensor(s) match no layer of this model, "
            f"e.g. {sorted(unused)[0]}"
        )
    # NOTE: the fused native decode reads the base layers' raw weights and would skip the
    # adapter; the op-by-op path calls each (wrapped) layer.
    if hasattr(model, "fused_decode"):
        model.fused_decode = False
    return adapted
