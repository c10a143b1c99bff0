"""Eval loss and perplexity of a model (or base + adapter) on the records a fine-tuning run
held out: the same seeded split, so ``kiln finetune eval`` with the run's ``--seed`` and
``--eval-fraction`` scores exactly the records training never saw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.text import load_chat_template
from kiln.train.data import Example, split
from kiln.train.formats import load_examples
from kiln.train.loss import mean_loss
from kiln.train.model_io import TrainableModel, load_for_training
from kiln.train.packing import collate, pack


@dataclass(frozen=True)
class EvalScore:
    loss: float
    """Mean next-token cross-entropy per labelled (response) token."""
    num_examples: int
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass(frozen=True)
class EvalData:
    data: str | Path
    data_format: str = "dolly"
    chat_template: str | None = None
    sequence_length: int = 512
    packing: bool = True
    eval_fraction: float = 0.05
    seed: int = 0
    batch_size: int = 4

    def held_out(self, trainable: TrainableModel) -> list[Example]:
        examples = load_examples(
            self.data,
            self.data_format,
            trainable.tokenizer,
            lambda: load_chat_template(trainable.checkpoint.tokenizer_config, self.chat_template),
        )
        return split(examples, self.eval_fraction, self.seed)[1]


def score(trainable: TrainableModel, examples: list[Example], spec: EvalData) -> EvalScore:
    tokenizer = trainable.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = pack(examples, spec.sequence_length, pad_id, spec.packing)
    size = spec.batch_size
    batches = [collate(sequences[i : i + size]) for i in range(0, len(sequences), size)]
    tokens = sum(b.num_label_tokens for b in batches)
    return EvalScore(mean_loss(trainable.model, batches), len(examples), tokens)


def evaluate(
    model: str | None, spec: EvalData, adapter: str | Path | None = None
) -> list[tuple[str, EvalScore]]:
    """``[(label, score)]``: the model's; with an adapter, the model's alone first (before)
    and then with the adapter applied (after), on the same held-out records."""
    from kiln.train.adapter import load_adapter

    trainable = load_for_training(model)
    examples = spec.held_out(trainable)
    name = trainable.checkpoint.name
    with torch.no_grad():
        results = [(name, score(trainable, examples, spec))]
        if adapter is not None:
            load_adapter(trainable.model, adapter)
            results.append((f"{name} + {adapter}", score(trainable, examples, spec)))
    return results
