"""Load a model for training with kiln's loader, and save it as a Hugging Face directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.models.base import CausalLM
from kiln.models.layers.linear import Linear
from kiln.models.loader import build_model
from kiln.models.registry import MODEL_REGISTRY
from kiln.text import Tokenizer
from kiln.train.lora import LoRAConfig, adapted_projections, adapter_state
from kiln.weights.checkpoint import Checkpoint
from kiln.weights.resolve import resolve_checkpoint


@dataclass
class TrainableModel:
    model: CausalLM
    checkpoint: Checkpoint
    tokenizer: Tokenizer
    config: ModelConfig


def load_for_training(model: str | None, device: str = "cpu") -> TrainableModel:
    """Any checkpoint kiln serves (HF directory, hub id, GGUF, the default model), in float32
    with every weight dequantized: quantized layers have no gradients."""
    checkpoint = resolve_checkpoint(model)
    config = ModelConfig.from_hf(checkpoint.config, checkpoint.generation_config)
    if not MODEL_REGISTRY[config.model_type].supports_training:
        trainable = sorted(t for t, cls in MODEL_REGISTRY.items() if cls.supports_training)
        raise ConfigError(
            f"fine-tuning supports {', '.join(trainable)} models, not {config.model_type!r}"
        )
    loaded = build_model(
        checkpoint, config, torch.float32, torch.device(device), quantize="none", inference=False
    )
    tokenizer = Tokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config)
    return TrainableModel(loaded, checkpoint, tokenizer, config)


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names: fused layers split back into q/k/v and
    gate/up (the inverse of what :meth:`CausalLM.load_weights` does)."""
    linears = model.linear_layers()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        owner, _, attr = name.rpartition(".")
        layer = linears.get(owner)
        if layer is None or len(layer.output_sizes) == 1:
            state[name] = tensor.detach().contiguous()
            continue
        for hf_owner, shard in model.hf_projections(owner).values():
            rows = Linear.shard_rows(layer, shard)
            state[f"{hf_owner}.{attr}"] = tensor[rows].detach().clone()
    return state


def save_hf_model(model: CausalLM, checkpoint: Checkpoint, out: Path) -> None:
    """``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer
    files: a directory ``kiln generate --model`` (and transformers) can load."""
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    config["torch_dtype"] = "float32"
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", dict(checkpoint.generation_config))
    _write_json(out / "tokenizer_config.json", dict(checkpoint.tokenizer_config))
    checkpoint.tokenizer.save(str(out / "tokenizer.json"))
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})


def save_adapter(model: CausalLM, lora: LoRAConfig, base_name: str, out: Path) -> None:
    """The LoRA weights and their settings, named as PEFT names them for the unfused model."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(out / "adapter_model.safetensors"))
    _write_json(
        out / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_name,
            "r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": adapted_projections(model),
            "bias": "none",
        },
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
