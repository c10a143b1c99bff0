"""The training step's fast paths compute what the plain ones do, values and gradients:
LoRA's stacked update, padding left out of the forward, and packed attention cut by split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln.models.layers.attention import AttentionMetadata, PagedAttention
from kiln.models.layers.linear import Linear
from kiln.train.data import Record, tokenize_dolly
from kiln.train.lora import LoRAConfig, LoRALinear, apply_lora
from kiln.train.loss import loss_sum, packed_logits
from kiln.train.model_io import load_for_training
from kiln.train.packing import IGNORE_INDEX, collate, pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _per_projection(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The update written out one projection at a time, on its own row block."""
    out = layer.base.forward(x)
    parts = list(out.split(layer.base.output_sizes, dim=-1))
    for name, shard in layer.shards.items():
        update = x @ layer.lora_a[name].t() @ layer.lora_b[name].t()
        parts[shard] = parts[shard] + layer.scaling * update
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize(
    "shards",
    [{"q_proj": 0, "k_proj": 1, "v_proj": 2}, {"q_proj": 0, "v_proj": 2}, {"o_proj": 0}],
    ids=["all of qkv", "q and v only", "unfused"],
)
def test_stacked_lora_update_equals_each_projection(shards: dict[str, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [12, 4, 4] if len(shards) > 1 or "q_proj" in shards else [12]
    base = Linear(12, sizes)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=generator))
    layer = LoRALinear(base, shards, LoRAConfig(r=3, alpha=6, dropout=0.0))
    # NOTE: A too from the test's generator: its own init draws from the global RNG, whose
    # state depends on the tests run before, so the values (and rounding) would vary.
    for p in [*layer.lora_a.values(), *layer.lora_b.values()]:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator))
    x = torch.randn(5, 12, generator=generator)

    fast = layer(x)
    fast.square().sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    plain = _per_projection(layer, x)
    plain.square().sum().backward()
    # Float32 sums in another order: equal up to rounding, relative to values of ~1e2-1e3.
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    for name, param in layer.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(fast_grads[name], param.grad, rtol=1e-5, atol=1e-3)
    if "k_proj" not in shards and len(sizes) > 1:
        # A fused block left out of the targets gets nothing added.
        torch.testing.assert_close(fast[:, 12:16], base.forward(x)[:, 12:16], rtol=0, atol=0)


def test_padding_is_left_out_without_changing_loss_or_gradients(stories_dir: Path) -> None:
    tiny = load_for_training(str(stories_dir))
    apply_lora(tiny.model, LoRAConfig(r=4, dropout=0.0))
    records = [Record("Name a colour.", "Red."), Record("Count to three.", "One, two, three.")]
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in records]
    # One sample per sequence (--no-packing): each sequence ends in a padding segment.
    batch = collate(pack(examples, max(len(e) for e in examples) + 7, pad_id=0, packing=False))
    assert batch.num_pad > 7 and len(batch.pad_segments) == 2
    unpadded = batch.without_padding()
    assert len(unpadded.input_ids) == batch.num_real_tokens
    assert unpadded.num_label_tokens == batch.num_label_tokens

    params = [p for p in tiny.model.parameters() if p.requires_grad]
    loss = loss_sum(tiny.model, batch)  # runs the batch without its padding
    fast_grads = torch.autograd.grad(loss, params)
    logits = packed_logits(tiny.model, batch)  # every token, padding included
    keep = batch.labels != IGNORE_INDEX
    full = F.cross_entropy(logits[keep], batch.labels[keep], reduction="sum")
    full_grads = torch.autograd.grad(full, params)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    for fast, slow in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_packed_attention_by_split_equals_per_sequence_slices() -> None:
    generator = torch.Generator().manual_seed(0)
    attention = PagedAttention(num_heads=4, num_kv_heads=2, head_dim=8, scale=8**-0.5)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=generator, requires_grad=True)
    kv = torch.randn(2, total, 2, 8, generator=generator, requires_grad=True)
    metadata = AttentionMetadata.packed(lengths)

    fast = attention.attend_packed(q, kv, metadata)
    fast_grads = torch.autograd.grad(fast.square().sum(), (q, kv))
    plain = attention.attend(q, kv, metadata)
    plain_grads = torch.autograd.grad(plain.square().sum(), (q, kv))
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
