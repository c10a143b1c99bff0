"""Tensor parallelism as a transform of an allocated model, not a second implementation.

:func:`shard_model` rewrites one rank's module tree before its weights are copied in:
column-parallel q/k/v and gate/up (plain :class:`Linear` layers holding the rank's rows),
row-parallel o/down with an all-reduce, a vocabulary-parallel embedding and an LM head whose
logits are gathered. The attention modules then hold ``heads / N`` query heads and
``kv_heads / N`` KV heads, so the rank's KV cache holds only its heads.

It returns a :class:`ShardedWeights` that reads the rank's part of each checkpoint tensor:
from safetensors only that part is read; from GGUF or PyTorch .bin files each tensor is read,
sliced and dropped before the next, so a rank holds at most its shard plus one checkpoint
tensor (the whole model is never loaded by any rank). :func:`load_rank_model` puts the two
together; it is the one answer to "rank r's part of the checkpoint", used both by a TP worker
at load time and by ``kiln export --tp N``, which saves each rank's part as that rank's file.

Heads and KV heads must divide N (each rank holds whole heads, GQA groups included) and so
must the vocabulary (nothing is padded): :func:`check_tp_degree` lists the degrees that
work. The MLP's intermediate size may split unevenly (the row-parallel sum does not care).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from kiln.config import ConfigError, ModelConfig
from kiln.errors import ModelLoadError
from kiln.models.base import CausalLM
from kiln.models.gptj import GPTJForCausalLM
from kiln.models.layers.attention import PagedAttention
from kiln.models.layers.linear import Linear
from kiln.models.llama import LlamaForCausalLM
from kiln.models.loader import allocate_model
from kiln.parallel.group import TensorParallelGroup, split
from kiln.parallel.layers import GatheredHead, RowParallelLinear, VocabParallelEmbedding
from kiln.plan.sizing import valid_tp_degrees
from kiln.quantization import GroupQuantized
from kiln.weights.checkpoint import Checkpoint, WeightIterator
from kiln.weights.hf import safetensors_files


@dataclass(frozen=True)
class ParallelLayout:
    """Where an architecture's layers are split (module-name suffixes)."""

    column: tuple[str, ...]
    row: tuple[str, ...]
    embedding: str
    head: str
    head_dims: tuple[str, ...] = ("num_heads", "num_kv_heads", "q_size", "kv_size")
    """Attributes of attention modules counted in heads (or head-sized rows): divided by N."""


LAYOUTS: dict[type[CausalLM], ParallelLayout] = {
    LlamaForCausalLM: ParallelLayout(
        column=("self_attn.qkv_proj", "mlp.gate_up_proj"),
        row=("self_attn.o_proj", "mlp.down_proj"),
        embedding="model.embed_tokens",
        head="lm_head",
    ),
    GPTJForCausalLM: ParallelLayout(
        column=("attn.qkv_proj", "mlp.fc_in"),
        row=("attn.out_proj", "mlp.fc_out"),
        embedding="transformer.wte",
        head="lm_head",
    ),
}


def check_tp_degree(config: ModelConfig, tp: int) -> None:
    """Raise :class:`ConfigError` naming the valid degrees unless ``tp`` shards this model."""
    if config.model_type not in ("llama", "mistral", "qwen2", "gptj"):
        raise ConfigError(f"tensor parallelism does not support model_type {config.model_type!r}")
    valid = valid_tp_degrees(config)
    if tp not in valid or config.intermediate_size < tp:
        raise ConfigError(
            f"tp={tp} does not divide this model: {config.num_attention_heads} attention heads, "
            f"{config.num_key_value_heads} KV heads and a vocabulary of {config.vocab_size} "
            f"must all be multiples of it; valid degrees: {', '.join(map(str, valid))}"
        )


def rank_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config one rank's KV cache is sized and allocated from: its share of the heads."""
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // tp,
        num_key_value_heads=config.num_key_value_heads // tp,
    )


@dataclass(frozen=True)
class _Slice:
    """Which part of a checkpoint tensor this rank keeps: along ``dim``, for each block of a
    fused parameter (q/k/v, gate/up: the checkpoint's separate tensors), ``(start, length)``."""

    dim: int
    parts: tuple[tuple[int, int], ...]
    zero: bool = False
    """A row-parallel bias on a rank other than 0: zeros, so the all-reduce adds it once."""

    def apply(self, tensor: torch.Tensor, block: int) -> torch.Tensor:
        if self.zero:
            return torch.zeros_like(tensor)
        start, length = self.parts[block]
        return tensor.narrow(self.dim, start, length).contiguous()

    def read(self, part: Any, block: int) -> torch.Tensor:
        """Read only this rank's part of a safetensors tensor (``safe_open(...).get_slice``)."""
        if self.zero:
            return torch.zeros_like(part[:])
        start, length = self.parts[block]
        index = (slice(start, start + length),)
        return part[(slice(None), *index) if self.dim == 1 else index]


class ShardedWeights:
    """The checkpoint-name -> rank-slice rules :func:`shard_model` leaves behind."""

    def __init__(self, model: CausalLM, rules: dict[str, _Slice]) -> None:
        self._model = model
        self._rules = rules

    def read(self, checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
        """The rank's part of every checkpoint tensor. From safetensors files only that part is
        read (a rank of N reads ~1/N of the bytes); other formats are read a tensor at a time
        and sliced (:meth:`slice`)."""
        files = safetensors_files(checkpoint.path) if checkpoint.path.is_dir() else []
        if not files:
            yield from self.slice(checkpoint.load_weights())
            return
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for hf_name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        name, block = self._model._param_for(hf_name)
                        rule = self._rules.get(name)
                        if rule is None:
                            yield hf_name, f.get_tensor(hf_name)
                        else:
                            yield hf_name, rule.read(f.get_slice(hf_name), block or 0)
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{file}: cannot read safetensors file ({e})") from e

    def slice(self, weights: WeightIterator) -> Iterator[tuple[str, torch.Tensor]]:
        """The rank's part of each checkpoint tensor (others pass through: norms, biases of
        nothing split). Quantized GGUF tensors are dequantized first: TP runs on floats."""
        for hf_name, tensor in weights:
            name, block = self._model._param_for(hf_name)
            rule = self._rules.get(name)
            if rule is None:
                yield hf_name, tensor
                continue
            if isinstance(tensor, GroupQuantized):
                tensor = tensor.dequantize()
            yield hf_name, rule.apply(tensor, block or 0)


def shard_model(model: CausalLM, group: TensorParallelGroup) -> ShardedWeights:
    """Rewrite ``model`` (allocated, weights not loaded yet) into ``group.rank``'s shard, in
    place; returns the rules that slice the checkpoint's tensors to fit it. Call
    :func:`tie_head` after loading."""
    layout = LAYOUTS.get(type(model))
    if layout is None:
        raise ConfigError(f"tensor parallelism does not support {type(model).__name__}")
    check_tp_degree(model.config, group.world_size)
    n, rank = group.world_size, group.rank
    rules: dict[str, _Slice] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and name.endswith(layout.column):
            parts = tuple(split(size, n, rank) for size in module.output_sizes)
            layer = Linear(
                module.in_features, [length for _, length in parts], module.bias is not None
            )
            rules[f"{name}.weight"] = rules[f"{name}.bias"] = _Slice(0, parts)
            _replace(model, name, layer, module)
        elif isinstance(module, Linear) and name.endswith(layout.row):
            start, length = split(module.in_features, n, rank)
            bias = module.bias is not None
            layer = RowParallelLinear(length, module.out_features, bias, group)
            rules[f"{name}.weight"] = _Slice(1, ((start, length),))
            rules[f"{name}.bias"] = _Slice(0, ((0, module.out_features),), zero=rank != 0)
            _replace(model, name, layer, module)
        elif isinstance(module, PagedAttention) or _is_attention(module, layout):
            for attr in layout.head_dims:
                if hasattr(module, attr):
                    setattr(module, attr, getattr(module, attr) // n)
        elif hasattr(module, "intermediate_size") and not isinstance(module, CausalLM):
            # The MLP's split point between gate and up: this rank's part of each.
            module.intermediate_size = split(module.intermediate_size, n, rank)[1]
    embedding = model.get_submodule(layout.embedding)
    start, length = split(embedding.weight.shape[0], n, rank)
    _replace(
        model,
        layout.embedding,
        VocabParallelEmbedding(start, length, embedding.weight.shape[1], group),
        embedding,
    )
    rules[f"{layout.embedding}.weight"] = _Slice(0, ((start, length),))
    head = getattr(model, layout.head)
    if isinstance(head, Linear):
        layer = GatheredHead(head.in_features, length, head.bias is not None, group)
        rules[f"{layout.head}.weight"] = rules[f"{layout.head}.bias"] = _Slice(
            0, ((start, length),)
        )
        _replace(model, layout.head, layer, head)
    # NOTE: kiln_llama_decode is built for one whole model (quantized layers, all heads):
    # a rank always takes the op-by-op path, whose collectives live in the swapped layers.
    if hasattr(model, "fused_decode"):
        model.fused_decode = False
    return ShardedWeights(model, rules)


def allocate_rank_model(
    config: ModelConfig, dtype: torch.dtype, group: TensorParallelGroup, max_positions: int | None
) -> tuple[CausalLM, ShardedWeights]:
    """``group.rank``'s shard of the model, allocated on the CPU (untouched storage costs no
    memory there) with no weights loaded, and the rules that fit checkpoint tensors to it.

    No collective runs here: the group is only held by the swapped layers, so an exporter can
    build every rank's shard in one process."""
    model = allocate_model(config, dtype, torch.device("cpu"), max_positions)
    return model, shard_model(model, group)


def load_rank_model(
    checkpoint: Checkpoint,
    config: ModelConfig,
    dtype: torch.dtype,
    group: TensorParallelGroup,
    max_positions: int | None,
) -> CausalLM:
    """``group.rank``'s shard on the CPU, filled with its part of each checkpoint tensor (only
    that part is read from safetensors). A tied head is left untied: call :func:`tie_head` once
    the model is on its device; :func:`~kiln.models.loader.prepare_for_inference` is also left
    to the caller (an exporter saves the plain tensors)."""
    model, sharded = allocate_rank_model(config, dtype, group, max_positions)
    with torch.no_grad():
        model.load_weights(sharded.read(checkpoint), source=str(checkpoint.path))
        model.quantized_sources.clear()  # float ranks: no quantized head takes them
    return model


def tie_head(model: CausalLM, group: TensorParallelGroup) -> None:
    """After loading: a head tied to the embedding reads the rank's embedding rows and gathers
    the logits (left as is, a tied head would compute only this rank's slice)."""
    layout = LAYOUTS[type(model)]
    if getattr(model, layout.head) is None:
        embedding = model.get_submodule(layout.embedding)
        setattr(model, layout.head, GatheredHead.tied_to(embedding.weight, group))


def _is_attention(module: nn.Module, layout: ParallelLayout) -> bool:
    return any(hasattr(module, attr) for attr in layout.head_dims[:1]) and not isinstance(
        module, CausalLM
    )


def _replace(model: nn.Module, name: str, new: nn.Module, old: nn.Module) -> None:
    """Put ``new`` at ``name``, with ``old``'s dtype and device (its storage is dropped)."""
    reference = next(old.parameters())
    new.to(device=reference.device, dtype=reference.dtype)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
