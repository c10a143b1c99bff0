"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, seeded data
order, progress, metrics JSONL, atomic checkpoints and exact resumption."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kiln.errors import ConfigError
from kiln.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from kiln.train.config import TrainConfig
from kiln.train.data import Example
from kiln.train.lora import apply_lora, merge_lora
from kiln.train.loss import checkpoint_layers, loss_sum, mean_loss
from kiln.train.model_io import TrainableModel, save_adapter, save_hf_model
from kiln.train.packing import Batch, PackedSequence, collate, pack
from kiln.train.schedule import warmup_cosine

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each optimizer step run in this call (1-based step -> loss)."""
    eval_before: float | None = None
    eval_after: float | None = None
    tokens_per_s: float = 0.0
    resumed_from: int | None = None
    """The checkpoint step this run continued from (None: it started from step 0)."""


class Trainer:
    """Fine-tunes ``trainable.model`` in place on ``train`` (``evals`` held out), writing
    checkpoints and metrics under ``out``.

    The data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` of sequences packed
    once, so a resumed run recomputes exactly the batches it would have seen.
    """

    def __init__(
        self,
        trainable: TrainableModel,
        train: list[Example],
        evals: list[Example],
        config: TrainConfig,
        out: Path,
        progress: bool = True,
    ) -> None:
        self.trainable, self.model, self.config, self.out = trainable, trainable.model, config, out
        self.progress = progress
        torch.manual_seed(config.seed)  # LoRA's initial A matrices, dropout masks
        tokenizer = trainable.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        self.sequences = pack(
            [train[i] for i in order], config.sequence_length, pad_id, config.packing
        )
        self.eval_batches = _batches(
            pack(evals, config.sequence_length, pad_id, config.packing), config.batch_size
        )
        micro_batches = math.ceil(len(self.sequences) / config.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.warmup_steps = (
            config.warmup_steps
            if config.warmup_steps is not None
            else max(1, round(0.05 * self.total_steps))
        )
        if config.lora is not None:
            apply_lora(self.model, config.lora)
        else:
            for param in self.model.parameters():
                param.requires_grad_(True)
        if config.gradient_checkpointing:
            checkpoint_layers(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        """Optimizer steps done."""

    def _eval_loss(self) -> float:
        return mean_loss(self.model, self.eval_batches, bf16=self.config.bf16)

    def _lr_factor(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps)

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.sequences), generator=generator).tolist()
        size = self.config.batch_size
        first = index * self.config.grad_accum * size
        chosen = order[first : first + self.config.grad_accum * size]
        return _batches([self.sequences[i] for i in chosen], size)

    # --- checkpoints ---------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self) -> Path:
        state: dict[str, Any] = {
            "step": self.step,
            "config": json.dumps(self.config.resume_key(), sort_keys=True),
            "params": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        return save_checkpoint(self.out / CHECKPOINT_DIR, self.step, state)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint under ``out``, if any."""
        path = latest_checkpoint(self.out / CHECKPOINT_DIR)
        if path is None:
            return False
        state = load_checkpoint(path)
        if state["config"] != json.dumps(self.config.resume_key(), sort_keys=True):
            raise ConfigError(
                f"{path}: saved with other training settings; resume with the same ones "
                "(only save_every and eval_every may change)"
            )
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        _truncate_metrics(self.out / METRICS_FILE, self.step)
        return True

    # --- the loop --------------------------------------------------------------------------

    def run(
        self, stop_after: int | None = None, on_step: Callable[[int], None] | None = None
    ) -> TrainResult:
        """Train until ``total_steps`` (or, for a test of resumption, ``stop_after`` steps);
        evaluate before the first step and after the last."""
        config, result = self.config, TrainResult()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = (self.out / METRICS_FILE).open("a", encoding="utf-8")
        tensorboard = _tensorboard(self.out / TENSORBOARD_DIR)
        if self.step == 0 and self.eval_batches:
            result.eval_before = self._eval_loss()
            _log(metrics, tensorboard, {"step": 0, "eval_loss": result.eval_before})
        end = min(self.total_steps, stop_after or self.total_steps)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="finetune",
            unit="step",
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        tokens_done, started = 0, time.perf_counter()
        self.model.train()
        while self.step < end:
            batches = self.step_batches(self.step)
            num_labels = sum(b.num_label_tokens for b in batches)
            total = 0.0
            for batch in batches:
                # Each micro-batch's summed loss over the step's label count: the accumulated
                # gradient is that of the mean over every labelled token of the step.
                loss = loss_sum(self.model, batch, config.bf16) / max(num_labels, 1)
                loss.backward()
                total += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens_done += sum(b.num_real_tokens for b in batches)
            elapsed = time.perf_counter() - started
            result.losses[self.step] = total
            record = {
                "step": self.step,
                "loss": total,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_done / elapsed,
            }
            if config.eval_every and self.step % config.eval_every == 0 and self.eval_batches:
                record["eval_loss"] = self._eval_loss()
            _log(metrics, tensorboard, record)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tokens_done / elapsed:.0f}")
            bar.update(1)
            if config.save_every and self.step % config.save_every == 0:
                self.save()
            if on_step is not None:
                on_step(self.step)
        bar.close()
        result.tokens_per_s = tokens_done / max(time.perf_counter() - started, 1e-9)
        if self.step >= self.total_steps and self.eval_batches:
            result.eval_after = self._eval_loss()
            _log(metrics, tensorboard, {"step": self.step, "eval_loss": result.eval_after})
        metrics.close()
        if tensorboard is not None:
            tensorboard.close()
        return result

    def export(self) -> None:
        """Write the adapter (LoRA) under ``out/adapter`` and the merged model as a Hugging Face
        directory at ``out``."""
        lora = self.config.lora
        if lora is not None:
            save_adapter(self.model, lora, self.trainable.checkpoint.name, self.out / "adapter")
            merge_lora(self.model)
        save_hf_model(self.model, self.trainable.checkpoint, self.out)


def _batches(sequences: list[PackedSequence], size: int) -> list[Batch]:
    return [collate(sequences[i : i + size]) for i in range(0, len(sequences), size)]


def _log(file: Any, tensorboard: Any, record: dict[str, Any]) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()
    if tensorboard is not None:
        for key, value in record.items():
            if key != "step":
                tensorboard.add_scalar(f"train/{key}", value, record["step"])


def _tensorboard(log_dir: Path) -> Any:
    """A TensorBoard writer when ``tensorboard`` is installed, else None: the metrics JSONL
    holds the same figures either way."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
