"""Exact resumption: k steps, a checkpoint, a fresh process state, then the rest give the same
losses as one uninterrupted run; half-written checkpoints are never loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.errors import ConfigError
from kiln.train.checkpoints import latest_checkpoint
from kiln.train.config import TrainConfig
from kiln.train.data import read_dolly, split, tokenize_dolly
from kiln.train.lora import LoRAConfig
from kiln.train.model_io import load_for_training
from kiln.train.trainer import METRICS_FILE, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"
CONFIG = TrainConfig(
    sequence_length=128,
    lora=LoRAConfig(r=4, dropout=0.1),  # dropout: the RNG state must be restored too
    max_steps=6,
    batch_size=2,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=2,
    eval_fraction=0.1,
    save_every=3,
    seed=7,
)


def _trainer(stories_dir: Path, out: Path, config: TrainConfig = CONFIG) -> Trainer:
    tiny = load_for_training(str(stories_dir))
    records = read_dolly(DOLLY)[:40]
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in records]
    train, evals = split(examples, config.eval_fraction, config.seed)
    return Trainer(tiny, train, evals, config, out, progress=False)


def test_resume_continues_exactly(stories_dir: Path, tmp_path: Path) -> None:
    full = _trainer(stories_dir, tmp_path / "full").run().losses
    assert list(full) == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    first = _trainer(stories_dir, killed).run(stop_after=4).losses  # checkpoint at 3, then 4
    assert [first[s] for s in (1, 2, 3)] == pytest.approx([full[s] for s in (1, 2, 3)], abs=1e-5)
    torch.manual_seed(12345)  # whatever the RNG holds now must not leak into the resumed run
    resumed = _trainer(stories_dir, killed)
    assert resumed.resume() and resumed.step == 3
    rest = resumed.run().losses
    assert list(rest) == [4, 5, 6]
    for step in (4, 5, 6):
        assert rest[step] == pytest.approx(full[step], abs=1e-5)
    # The killed run's step 4 line was dropped and redone: one line per step.
    steps = [json.loads(line)["step"] for line in (killed / METRICS_FILE).read_text().splitlines()]
    assert [s for s in steps if s > 0] == [1, 2, 3, 4, 5, 6, 6]  # last: the final eval


def test_half_written_checkpoint_is_never_loaded(stories_dir: Path, tmp_path: Path) -> None:
    trainer = _trainer(stories_dir, tmp_path)
    trainer.run(stop_after=3)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) == root / "step-00000003"
    # What a kill -9 during the next save leaves: a temporary directory, partly written.
    partial = root / ".tmp-step-00000006"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    assert latest_checkpoint(root) == root / "step-00000003"
    fresh = _trainer(stories_dir, tmp_path)
    assert fresh.resume() and fresh.step == 3


def test_resume_refuses_other_settings(stories_dir: Path, tmp_path: Path) -> None:
    _trainer(stories_dir, tmp_path).run(stop_after=3)
    other = TrainConfig(**{**CONFIG.__dict__, "lr": 5e-4})
    with pytest.raises(ConfigError, match="other training settings"):
        _trainer(stories_dir, tmp_path, other).resume()
