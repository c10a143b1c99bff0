"""One fine-tuning run end to end: load, format and split the data, train (or resume), export."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.errors import ConfigError
from kiln.train.config import TrainConfig
from kiln.train.data import read_dolly, split, tokenize_dolly
from kiln.train.model_io import load_for_training
from kiln.train.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)


def finetune_run(
    model: str | None,
    data: str | Path,
    config: TrainConfig,
    out: Path,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` and write the merged model (and adapter) to ``out``."""
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run: pass --resume, or another --output"
        )
    trainable = load_for_training(model, device)
    records = read_dolly(data)
    examples = [tokenize_dolly(r, trainable.tokenizer) for r in records]
    train, evals = split(examples, config.eval_fraction, config.seed)
    trainer = Trainer(trainable, train, evals, config, out, progress=progress)
    if resume and not trainer.resume():
        logger.warning("--resume: no checkpoint under %s, starting from step 0", out)
    result = trainer.run()
    trainer.export()
    return result
