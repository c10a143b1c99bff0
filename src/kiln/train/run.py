"""One fine-tuning run end to end: load, format and split the data, train (or resume), export."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.errors import ConfigError
from kiln.text import load_chat_template
from kiln.train.config import TrainConfig
from kiln.train.data import split
from kiln.train.formats import load_examples
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
    examples = load_examples(
        data,
        config.data_format,
        trainable.tokenizer,
        lambda: load_chat_template(trainable.checkpoint.tokenizer_config, config.chat_template),
    )
    train, evals = split(examples, config.eval_fraction, config.seed)
    trainer = Trainer(trainable, train, evals, config, out, progress=progress)
    resumed = resume and trainer.resume()
    if resume and not resumed:
        logger.warning("--resume: no checkpoint under %s, starting from step 0", out)
    resumed_from = trainer.step if resumed else None
    result = trainer.run()
    result.resumed_from = resumed_from
    trainer.export()
    return result
