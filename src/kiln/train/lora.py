"""LoRA: low-rank updates on kiln's (fused) linear layers, and merging them into the weights.

kiln fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. An adapter here is kept
per original projection (``q_proj``, ``v_proj``...), each on its own row block of the fused
output, so the ranks, the targets and the saved adapter mean what they mean for an unfused
model. Merging adds ``scaling * B @ A`` to those rows of the base weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError
from kiln.models.base import CausalLM
from kiln.models.layers.linear import Linear

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPTJ_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
TARGET_MODULES = tuple(dict.fromkeys(LLAMA_TARGETS + GPTJ_TARGETS))
"""Projection names LoRA can target (Hugging Face names: the Llama family's, then GPT-J's); a
model adapts those of them it has."""


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGET_MODULES

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(TARGET_MODULES))
        if unknown or not self.target_modules:
            raise ConfigError(
                f"unknown LoRA target module(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(TARGET_MODULES)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen :class:`Linear` plus ``scaling * B_i A_i x`` on row block ``i`` of its output
    for each adapted projection ``i``.

    ``A`` starts like an ``nn.Linear`` weight (Kaiming uniform) and ``B`` at zero, so training
    starts from the base model exactly.
    """

    def __init__(
        self,
        base: Linear,
        shards: dict[str, int],
        config: LoRAConfig,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.shards = dict(sorted(shards.items(), key=lambda item: item[1]))
        """Adapted projection name -> its row block in ``base.output_sizes``."""
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)
        # NOTE: a quantized base (serving an adapter on a GGUF) has no float weight to follow.
        dtype = dtype or base.weight.dtype
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for name, shard in self.shards.items():
            a = torch.empty(config.r, base.in_features, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_a[name] = nn.Parameter(a)
            self.lora_b[name] = nn.Parameter(
                torch.zeros(base.output_sizes[shard], config.r, dtype=dtype)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        out = self.base.forward(x)
        a, b = self.stacked()
        # Two thin matmuls (x A^T, then B), never the full [out, in] product, for every adapted
        # projection at once: the second one adds the scaled update to the base output in the
        # same op. NOTE: done per projection (a matmul pair, a scaling, an add, then a concat of
        # the row blocks), a forward + backward of SmolLM2-135M's four adapted layers at 512
        # tokens took ~1.35x as long (2 cores, base matmuls included).
        h = F.linear(self.dropout(x), a)  # [..., n * r]
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling
        )
        return flat.view(out.shape)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every adapted projection's A stacked by rows [n * r, in], their B as one
        block-diagonal [out, n * r] matrix): a row block of the output that is not adapted (a
        fused projection left out of the targets) gets zero rows."""
        names = list(self.shards)  # in row-block order
        a = torch.cat([self.lora_a[n] for n in names]) if len(names) > 1 else self.lora_a[names[0]]
        by_shard = {shard: name for name, shard in self.shards.items()}
        first = self.lora_b[names[0]]
        blocks = [
            self.lora_b[by_shard[shard]] if shard in by_shard else first.new_zeros(size, 0)
            for shard, size in enumerate(self.base.output_sizes)
        ]
        return a, blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)

    def delta(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` for one projection: what merging adds to its rows."""
        return (self.lora_b[name] @ self.lora_a[name]) * self.scaling

    @torch.no_grad()
    def merge(self) -> Linear:
        """The base layer with every update added to its weight (the adapter is used up)."""
        for name, shard in self.shards.items():
            rows = self.base.shard_rows(shard)
            self.base.weight[rows] += self.delta(name).to(self.base.weight.dtype)
        return self.base


def _targets(model: CausalLM, layer_name: str, config: LoRAConfig) -> dict[str, int]:
    """Which of a layer's projections are targeted, with their row block."""
    projections = model.hf_projections(layer_name)
    return {
        name: shard for name, (_, shard) in projections.items() if name in config.target_modules
    }


def apply_lora(model: CausalLM, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Freeze every parameter and wrap the targeted linear layers (the LM head never): only
    the adapters train. Returns the wrappers by module name."""
    if any(layer.bits is not None for layer in model.linear_layers().values()):
        raise ConfigError("LoRA needs float weights: load the model with quantize='none'")
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for name, layer in model.linear_layers().items():
        if name == "lm_head":
            continue
        shards = _targets(model, name, config)
        if not shards:
            continue
        parent_name, _, attr = name.rpartition(".")
        wrapper = LoRALinear(layer, shards, config)
        setattr(model.get_submodule(parent_name), attr, wrapper)
        wrapped[name] = wrapper
    if not wrapped:
        raise ConfigError(f"no layer of this model matches {', '.join(config.target_modules)}")
    return wrapped


def merge_lora(model: CausalLM) -> None:
    """Fold every adapter into its base weight and put the plain layers back, so the model
    (and what is saved from it) is an ordinary kiln model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.merge())


def adapter_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's names for an unfused Hugging Face model
    (``base_model.model.<module>.<proj>.lora_A.weight``)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        parent = name.rpartition(".")[0]
        for proj in module.shards:
            prefix = f"base_model.model.{parent}.{proj}"
            state[f"{prefix}.lora_A.weight"] = module.lora_a[proj].detach().contiguous()
            state[f"{prefix}.lora_B.weight"] = module.lora_b[proj].detach().contiguous()
    return state


def adapted_projections(model: CausalLM) -> list[str]:
    """The projection names the model's adapters cover (PEFT's ``target_modules``)."""
    names = {proj for m in model.modules() if isinstance(m, LoRALinear) for proj in m.shards}
    return [name for name in TARGET_MODULES if name in names]
