"""LoRA on kiln's fused projections: merging equals base + adapter, targets hit only their rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.train.data import Record, tokenize_dolly
from kiln.train.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from kiln.train.loss import packed_logits
from kiln.train.model_io import TrainableModel, hf_state_dict, load_for_training
from kiln.train.packing import collate, pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(tiny: TrainableModel):
    records = [Record("Say hi.", "Hi there."), Record("Who?", "The dog.", "A dog ran.")]
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in records]
    return collate(pack(examples, sum(len(e) for e in examples), pad_id=0))


def _randomise_b(model: torch.nn.Module, generator: torch.Generator) -> None:
    # B starts at zero (the adapter is a no-op); give it values as training would.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                for b in module.lora_b.values():
                    b.copy_(torch.randn(b.shape, generator=generator) * 0.05)


def test_fresh_adapter_is_the_base_model(stories_dir: Path) -> None:
    tiny = load_for_training(str(stories_dir))
    batch = _batch(tiny)
    with torch.no_grad():
        base = packed_logits(tiny.model, batch)
    apply_lora(tiny.model, LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():
        torch.testing.assert_close(packed_logits(tiny.model, batch), base, rtol=0, atol=0)


def test_merged_logits_equal_base_plus_adapter(stories_dir: Path) -> None:
    tiny = load_for_training(str(stories_dir))
    batch = _batch(tiny)
    with torch.no_grad():
        base = packed_logits(tiny.model, batch)
    apply_lora(tiny.model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    _randomise_b(tiny.model, torch.Generator().manual_seed(0))
    tiny.model.eval()  # dropout off: the merged weights are the eval-time function
    with torch.no_grad():
        adapted = packed_logits(tiny.model, batch)
        assert (adapted - base).abs().max() > 1e-2  # the adapter does something
        merge_lora(tiny.model)
        merged = packed_logits(tiny.model, batch)
    assert not any(isinstance(m, LoRALinear) for m in tiny.model.modules())
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)


def test_targets_change_only_their_rows_of_fused_layers(stories_dir: Path) -> None:
    tiny = load_for_training(str(stories_dir))
    before = hf_state_dict(tiny.model)
    wrapped = apply_lora(tiny.model, LoRAConfig(r=2, target_modules=("q_proj", "up_proj")))
    assert set(wrapped["model.layers.0.self_attn.qkv_proj"].shards) == {"q_proj"}
    assert set(wrapped["model.layers.0.mlp.gate_up_proj"].shards) == {"up_proj"}
    assert "model.layers.0.self_attn.o_proj" not in wrapped
    trainable = [n for n, p in tiny.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    _randomise_b(tiny.model, torch.Generator().manual_seed(1))
    merge_lora(tiny.model)
    after = hf_state_dict(tiny.model)
    assert after.keys() == before.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    layers = tiny.config.num_hidden_layers
    expected = {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(layers)} | {
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(layers)
    }
    assert changed == expected
