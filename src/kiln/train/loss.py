"""The training forward (kiln's model forward without a KV cache) and the next-token loss."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kiln.models.base import CausalLM
from kiln.models.layers.attention import AttentionMetadata
from kiln.train.packing import IGNORE_INDEX, Batch


def packed_hidden(model: CausalLM, batch: Batch) -> torch.Tensor:  # [T, hidden]
    """Hidden states of a packed batch: every segment attends only within itself."""
    device = batch.input_ids.device
    metadata = AttentionMetadata.packed(batch.seq_lens, model.config.sliding_window, device)
    caches = [None] * model.config.num_hidden_layers
    return model.forward(batch.input_ids, batch.positions, caches, metadata)


def packed_logits(model: CausalLM, batch: Batch) -> torch.Tensor:  # [T, vocab]
    return model.compute_logits(packed_hidden(model, batch))


@contextlib.contextmanager
def autocast(device_type: str, bf16: bool) -> Iterator[None]:
    """bfloat16 autocast around a forward when ``bf16`` (a no-op otherwise)."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        yield


def loss_sum(model: CausalLM, batch: Batch, bf16: bool = False) -> torch.Tensor:
    """Summed cross-entropy over the labelled positions (the caller divides by the tokens of
    the whole optimizer step, so gradient accumulation weights every token equally).

    NOTE: logits only for labelled rows: prompts and padding need none, and the head's
    ``[T, vocab]`` output is the largest activation of a small model. Padding is not run at
    all (:meth:`Batch.without_padding`).
    """
    batch = batch.without_padding()
    keep = batch.labels != IGNORE_INDEX
    with autocast(batch.input_ids.device.type, bf16):
        hidden = packed_hidden(model, batch)
        logits = model.compute_logits(hidden[keep])  # [N, vocab]
    return F.cross_entropy(logits.float(), batch.labels[keep], reduction="sum")


@torch.no_grad()
def mean_loss(model: CausalLM, batches: Iterable[Batch], bf16: bool = False) -> float:
    """Mean next-token loss per labelled token over ``batches`` (dropout off)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        total += float(loss_sum(model, batch, bf16))
        tokens += batch.num_label_tokens
    model.train(was_training)
    return total / max(tokens, 1)


def checkpoint_layers(model: CausalLM) -> None:
    """Gradient checkpointing: each decoder layer keeps only its inputs for the backward pass
    and recomputes the rest there (non-reentrant, so the layer's arguments need not be tensors
    and dropout masks come out the same: the RNG state is replayed)."""
    for layer in model.decoder_layers():
        # NOTE: the model calls ``layer.forward`` directly (no module hooks on the hot path),
        # so the instance's ``forward`` is what gets replaced; names and weights stay as they are.
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
