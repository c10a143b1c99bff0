"""Training options that change how, not what, is computed: gradient checkpointing (same
losses, far fewer saved activations) and bfloat16 autocast (close to float32, not equal)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from kiln.train.config import TrainConfig
from kiln.train.data import read_dolly, split, tokenize_dolly
from kiln.train.lora import LoRAConfig
from kiln.train.loss import loss_sum
from kiln.train.model_io import load_for_training
from kiln.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"
CONFIG = TrainConfig(
    sequence_length=128,
    lora=LoRAConfig(r=4, dropout=0.1),  # dropout: recomputation must replay the same masks
    max_steps=3,
    batch_size=2,
    lr=1e-3,
    warmup_steps=1,
    eval_fraction=0.1,
    seed=2,
)


def _trainer(stories_dir: Path, out: Path, **changes: object) -> Trainer:
    config = dataclasses.replace(CONFIG, **changes)
    tiny = load_for_training(str(stories_dir))
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in read_dolly(DOLLY)[:30]]
    train, evals = split(examples, config.eval_fraction, config.seed)
    return Trainer(tiny, train, evals, config, out, progress=False)


def _saved_bytes(trainer: Trainer) -> int:
    """Bytes autograd keeps for the backward pass of one micro-batch's loss."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum(trainer.model, trainer.step_batches(0)[0])
    return saved


def test_gradient_checkpointing_same_losses_less_memory(stories_dir: Path, tmp_path: Path) -> None:
    plain = _trainer(stories_dir, tmp_path / "plain")
    plain_bytes = _saved_bytes(plain)
    expected = plain.run().losses
    checkpointed = _trainer(stories_dir, tmp_path / "ckpt", gradient_checkpointing=True)
    checkpointed_bytes = _saved_bytes(checkpointed)
    losses = checkpointed.run().losses
    assert list(losses.values()) == pytest.approx(list(expected.values()), abs=1e-6)
    # Only each layer's inputs (and what lies outside the layers) are kept.
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)
    # Checkpointing changes no number, so a run may resume with it switched.
    assert checkpointed.config.resume_key() == plain.config.resume_key()


def test_bf16_autocast_is_close_to_float32(stories_dir: Path, tmp_path: Path) -> None:
    fp32 = _trainer(stories_dir, tmp_path / "fp32").run().losses
    bf16 = _trainer(stories_dir, tmp_path / "bf16", bf16=True).run().losses
    assert all(math.isfinite(v) for v in bf16.values())
    assert bf16[1] != fp32[1]  # autocast did run in bfloat16
    assert bf16[1] == pytest.approx(fp32[1], abs=0.05)  # before any update: rounding only
