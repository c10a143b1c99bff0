"""Fine-tuning speed and memory of kiln's trainer vs TRL's ``SFTTrainer``, in one run.

Both sides train LoRA adapters on the same Hugging Face directory (a GGUF, such as the default
model, is first dequantized by kiln and written as one, so both start from identical float32
weights), on the same token ids (the Dolly records tokenized once, by kiln, with the same loss
mask: the answer and its EOS), with the same sequence length, micro-batch size, gradient
accumulation, LoRA settings, learning-rate schedule and torch threads, packing on both:

- kiln: greedy packing in a seeded order into sequences of the sequence length, samples
  attending only within themselves (the padding at the end of a sequence is not computed);
- TRL: ``packing=True`` with its default ``"bfd"`` strategy (best-fit decreasing), which turns
  on padding-free batches (the micro-batch flattened into one row, with per-sample positions).

Each side runs in a subprocess of its own, so its peak resident memory (``ru_maxrss``: the
whole process, model load included) is its own. The two processes load at the same time, then
train in lockstep: kiln's step 1, TRL's step 1, TRL's step 2, kiln's step 2, ... each waiting
for the parent's word before its next step, so that a burst of load from elsewhere on the
machine slows both sides alike instead of whichever happened to run then. Each side times its
own steps; tokens/s counts the non-padding tokens of the timed steps (those after the warm-up
ones) over their summed time.

``python -m kiln.bench.finetune SIDE SETTINGS.json RESULT.json`` is one side's subprocess: it
reads "go" lines on stdin (one before each step) and answers "ready" once loaded and "done STEP
SECONDS" after each step on stdout; everything the libraries print goes to stderr.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

KILN = "kiln"
TRL = "trl"
SIDES = (KILN, TRL)
LABELS = {KILN: "kiln", TRL: "TRL SFTTrainer"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100
"""Label of a position without loss: kiln's and transformers' ``ignore_index`` alike."""
LOG_TAIL = 3000
"""Characters of a failed side's output shown in the error."""


class BenchError(KilnError):
    """A side could not be measured (it failed, or its peer is not installed)."""


@dataclass(frozen=True)
class Settings:
    """What both sides train with (written as JSON for the subprocesses)."""

    model_dir: str
    """A Hugging Face directory with float32 safetensors, loaded by both sides."""
    model_name: str
    examples: str
    """A JSONL file of ``{"token_ids": [...], "loss_mask": [...]}``, one per record."""
    workdir: str
    sequence_length: int = 256
    batch_size: int = 2
    grad_accum: int = 1
    steps: int = 20
    warmup: int = 3
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lr: float = 2e-4
    threads: int = 2
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def lr_warmup_steps(self) -> int:
        """kiln's default learning-rate warmup (5% of the steps, at least one), given to both."""
        return max(1, round(0.05 * self.total_steps))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        data["lora_targets"] = tuple(data["lora_targets"])
        return cls(**data)


@dataclass
class SideResult:
    """One side's measurements."""

    side: str
    tokens: int
    """Non-padding tokens of the timed steps."""
    seconds: float
    """Wall time of the timed steps, summed."""
    peak_rss_mib: float
    """The process's peak resident memory (``ru_maxrss``), loading included."""
    start_rss_mib: float | None
    """Resident memory just before the first training step (model, adapters, data ready)."""
    losses: list[float]
    """Training loss of every step, warm-up ones included."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of every step, warm-up ones included."""
    notes: dict[str, str] = field(default_factory=dict)
    """How this side packs, attends and optimizes (shown under the table)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    settings: Settings
    results: dict[str, SideResult]
    load_average: tuple[float, float, float] | None = None
    """The machine's 1, 5 and 15-minute load averages when the sides finished: how much else
    ran meanwhile. The lockstep spreads that over both sides, but steps that wait on the
    scheduler more than they compute say little about either side's code: compare figures
    measured at a similar, low load."""

    def ratios(self) -> dict[str, float] | None:
        """kiln / TRL of tokens/s and of peak memory (None when TRL was not run)."""
        kiln, trl = self.results.get(KILN), self.results.get(TRL)
        if kiln is None or trl is None or trl.tokens_per_s == 0:
            return None
        return {
            "tokens_per_s": kiln.tokens_per_s / trl.tokens_per_s,
            "peak_rss": kiln.peak_rss_mib / trl.peak_rss_mib,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "sides": {
                side: {**dataclasses.asdict(r), "tokens_per_s": r.tokens_per_s}
                for side, r in self.results.items()
            },
            "ratios": self.ratios(),
            "load_average": self.load_average,
        }

    def format_table(self) -> str:
        s = self.settings
        lines = [
            f"model: {s.model_name} (float32) | torch threads: {s.threads} | sequence length "
            f"{s.sequence_length} x batch {s.batch_size} x grad accum {s.grad_accum} | LoRA r "
            f"{s.lora_r}, alpha {s.lora_alpha:g}, dropout {s.lora_dropout:g} on "
            f"{','.join(t.removesuffix('_proj') for t in s.lora_targets)} | {s.steps} timed "
            f"steps after {s.warmup} warm-up, sides in lockstep"
        ]
        header = [
            "",
            "tokens/s",
            "s/step",
            "peak RSS MiB",
            "RSS at start MiB",
            "loss first -> last",
        ]
        rows = [header]
        for side, r in self.results.items():
            timed = r.step_seconds[s.warmup :]
            rows.append(
                [
                    LABELS[side],
                    f"{r.tokens_per_s:.0f}",
                    f"{statistics.median(timed):.2f}" if timed else "-",
                    f"{r.peak_rss_mib:.0f}",
                    f"{r.start_rss_mib:.0f}" if r.start_rss_mib is not None else "-",
                    f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}" if r.losses else "-",
                ]
            )
        ratios = self.ratios()
        if ratios is not None:
            tokens, memory = f"{ratios['tokens_per_s']:.2f}x", f"{ratios['peak_rss']:.2f}x"
            rows.append(["kiln/TRL", tokens, "", memory, "", ""])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for i, row in enumerate(rows):
            lines.append(
                "  ".join(
                    cell.ljust(w) if j == 0 else cell.rjust(w)
                    for j, (cell, w) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("s/step: the median of the timed steps")
        if self.load_average is not None:
            loads = "/".join(f"{x:.1f}" for x in self.load_average)
            lines.append(f"load average (1/5/15 min) at the end: {loads}")
        for side, r in self.results.items():
            notes = "; ".join(f"{k}: {v}" for k, v in r.notes.items())
            lines.append(f"{LABELS[side]}: {notes}")
        return "\n".join(lines)


# --- the parent: prepare the model and the data, run the sides --------------------------------


def run(
    model: str | None,
    data: Path,
    *,
    sequence_length: int = 256,
    batch_size: int = 2,
    grad_accum: int = 1,
    steps: int = 20,
    warmup: int = 3,
    lr: float = 2e-4,
    threads: int = 2,
    records: int | None = None,
    sides: Sequence[str] = SIDES,
    seed: int = 0,
    log: Any = sys.stderr,
) -> Report:
    """Prepare the shared model directory and token ids, then train the sides in lockstep in
    subprocesses of their own, and collect their measurements."""
    if TRL in sides:
        missing = missing_trl_packages()
        if missing:
            raise BenchError(
                f"the TRL side needs {', '.join(missing)}: pip install 'kiln[bench-train]' "
                "(or make bench-finetune)"
            )
    with tempfile.TemporaryDirectory(prefix="kiln-bench-finetune-") as tmp:
        workdir = Path(tmp)
        print("preparing the model and the data...", file=log, flush=True)
        model_dir, model_name, num_examples = prepare(model, data, workdir, records)
        settings = Settings(
            model_dir=str(model_dir),
            model_name=model_name,
            examples=str(workdir / "examples.jsonl"),
            workdir=str(workdir),
            sequence_length=sequence_length,
            batch_size=batch_size,
            grad_accum=grad_accum,
            steps=steps,
            warmup=warmup,
            lr=lr,
            threads=threads,
            seed=seed,
        )
        (workdir / "settings.json").write_text(settings.to_json(), encoding="utf-8")
        print(
            f"loading {', '.join(LABELS[side] for side in sides)}; then {settings.total_steps} "
            f"steps each on {num_examples} records, in lockstep...",
            file=log,
            flush=True,
        )
        results = run_lockstep(sides, workdir / "settings.json", workdir, log)
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        return Report(settings, results, load)


def missing_trl_packages() -> list[str]:
    """The TRL side's packages that are not installed (found without importing them)."""
    from importlib.util import find_spec

    return [name for name in ("trl", "peft", "datasets") if find_spec(name) is None]


def prepare(
    model: str | None, data: Path, workdir: Path, records: int | None
) -> tuple[Path, str, int]:
    """(model directory, model name, number of examples): the model as a float32 Hugging Face
    directory both sides load, and the records' token ids in ``workdir/examples.jsonl``."""
    from kiln.text import Tokenizer, load_chat_template
    from kiln.train.formats import load_examples
    from kiln.weights.resolve import resolve_checkpoint

    checkpoint = resolve_checkpoint(model)
    path = Path(checkpoint.path)
    if path.is_dir() and any(path.glob("*.safetensors")) and not checkpoint.weight_formats:
        model_dir = path
    else:
        # NOTE: transformers reads a GGUF too, but dequantizes it its own way; kiln's export
        # of the weights it trains on guarantees both sides the very same starting point.
        from kiln.train.model_io import load_for_training, save_hf_model

        model_dir = workdir / "model"
        trainable = load_for_training(model)
        save_hf_model(trainable.model, trainable.checkpoint, model_dir)
        del trainable
        gc.collect()
    tokenizer = Tokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config)
    examples = load_examples(
        data,
        "dolly",
        tokenizer,
        lambda: load_chat_template(checkpoint.tokenizer_config, None),
    )
    if records is not None:
        examples = examples[:records]
    with (workdir / "examples.jsonl").open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(
                json.dumps({"token_ids": example.token_ids, "loss_mask": example.loss_mask}) + "\n"
            )
    name = Path(checkpoint.name).name if model else checkpoint.name
    return model_dir, name, len(examples)


class _Child:
    """One side's subprocess and its end of the lockstep protocol."""

    def __init__(self, side: str, settings_path: Path, workdir: Path, threads: int) -> None:
        self.side = side
        self.result_path = workdir / f"{side}.json"
        self.log_path = workdir / f"{side}.log"
        env = {
            **os.environ,
            # Both sides' BLAS/OpenMP pools sized alike, before torch starts them.
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(workdir / "datasets-cache"),
            "WANDB_DISABLED": "true",
        }
        command = [sys.executable, "-m", "kiln.bench.finetune", side, str(settings_path)]
        with self.log_path.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [*command, str(self.result_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )

    def expect(self, word: str) -> list[str]:
        """The next line's words, which must start with ``word``."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(word):
            self.process.wait()
            self.fail(f"said {line.strip()!r}, expected {word!r}" if line else "stopped")
        return line.split()

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self) -> SideResult:
        if self.process.wait() != 0 or not self.result_path.is_file():
            self.fail(f"exited with status {self.process.returncode}")
        return SideResult(**json.loads(self.result_path.read_text(encoding="utf-8")))

    def fail(self, what: str) -> None:
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]
        raise BenchError(f"{LABELS[self.side]} {what}; the end of its output:\n{tail}")


def run_lockstep(
    sides: Sequence[str], settings_path: Path, workdir: Path, log: Any = sys.stderr
) -> dict[str, SideResult]:
    """Start every side (they load at the same time), then let them take one step each in
    turn, the order swapped every step; each side's output goes to ``workdir/SIDE.log``."""
    settings = Settings.from_json(settings_path.read_text(encoding="utf-8"))
    children = [_Child(side, settings_path, workdir, settings.threads) for side in sides]
    try:
        for child in children:
            child.expect("ready")
        for step in range(1, settings.total_steps + 1):
            times = []
            for child in children if step % 2 else children[::-1]:
                child.go()
                _, done, seconds = child.expect("done")
                if int(done) != step:
                    child.fail(f"finished step {done}, expected {step}")
                times.append(f"{LABELS[child.side]} {float(seconds):.2f} s")
            kind = "warm-up" if step <= settings.warmup else "timed"
            print(f"  step {step} ({kind}): {', '.join(times)}", file=log, flush=True)
        return {child.side: child.result() for child in children}
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()


# --- the subprocesses: one side each ----------------------------------------------------------


class Lockstep:
    """A side's subprocess end of the protocol: "ready" once loaded, then for each step wait
    for "go" on stdin, train, and answer "done STEP SECONDS" on stdout.

    Library output that would go to stdout is sent to stderr instead: stdout is the parent's
    channel.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        self.started: float | None = None
        self.step_seconds: list[float] = []

    def ready(self) -> None:
        """Loaded: wait for the first step's turn."""
        self._send("ready")
        self._wait()

    def step_done(self, step: int) -> None:
        """Called by the side's own end-of-step hook: report, then wait for the next turn."""
        assert self.started is not None
        seconds = time.perf_counter() - self.started
        self.step_seconds.append(seconds)
        self._send(f"done {step} {seconds:.6f}")
        if step < self.total:
            self._wait()

    def timed(self, warmup: int) -> float:
        return sum(self.step_seconds[warmup:])

    def _send(self, line: str) -> None:
        self.channel.write(line + "\n")
        self.channel.flush()

    def _wait(self) -> None:
        if sys.stdin.readline().strip() != "go":
            raise BenchError("the benchmark stopped")
        self.started = time.perf_counter()


def read_examples(path: str | Path) -> list[tuple[list[int], list[bool]]]:
    with Path(path).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["token_ids"], row["loss_mask"]) for row in rows]


def rss_mib() -> float | None:
    """Current resident memory of this process (Linux), or None."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def train_kiln(settings: Settings, lockstep: Lockstep) -> SideResult:
    """kiln's :class:`~kiln.train.trainer.Trainer`, as ``kiln finetune`` runs it."""
    import torch

    torch.set_num_threads(settings.threads)
    from kiln.train.config import TrainConfig
    from kiln.train.data import Example
    from kiln.train.lora import LoRAConfig
    from kiln.train.model_io import load_for_training
    from kiln.train.trainer import Trainer

    trainable = load_for_training(settings.model_dir)
    examples = [Example(ids, mask) for ids, mask in read_examples(settings.examples)]
    config = TrainConfig(
        sequence_length=settings.sequence_length,
        packing=True,
        lora=LoRAConfig(
            r=settings.lora_r,
            alpha=settings.lora_alpha,
            dropout=settings.lora_dropout,
            target_modules=settings.lora_targets,
        ),
        max_steps=settings.total_steps,
        lr=settings.lr,
        warmup_steps=settings.lr_warmup_steps,
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        eval_fraction=0.0,
        seed=settings.seed,
    )
    out = Path(settings.workdir) / "kiln-run"
    trainer = Trainer(trainable, examples, [], config, out, progress=False)
    # Counted before training, so counting costs the timed steps nothing.
    tokens = [
        sum(b.num_real_tokens for b in trainer.step_batches(step))
        for step in range(settings.warmup, settings.total_steps)
    ]
    start_rss = rss_mib()
    lockstep.ready()
    result = trainer.run(on_step=lockstep.step_done)
    padding = sum(s.num_pad for s in trainer.sequences) / max(
        len(trainer.sequences) * settings.sequence_length, 1
    )
    return SideResult(
        side=KILN,
        tokens=sum(tokens),
        seconds=lockstep.timed(settings.warmup),
        peak_rss_mib=peak_rss_mib(),
        start_rss_mib=start_rss,
        losses=[result.losses[step] for step in sorted(result.losses)],
        step_seconds=lockstep.step_seconds,
        notes={
            "packing": f"greedy, {len(trainer.sequences)} sequences of "
            f"{settings.sequence_length} tokens ({padding:.0%} of them padding)",
            "attention": "SDPA per sample",
            "optimizer": "torch.optim.AdamW",
        },
    )


def train_trl(settings: Settings, lockstep: Lockstep) -> SideResult:
    """TRL's ``SFTTrainer`` with PEFT LoRA on the transformers model of the same directory."""
    import torch

    torch.set_num_threads(settings.threads)
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokens_by_step: dict[int, int] = {}
    start_rss: float | None = None

    class CountingSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """Counts the non-padding tokens each optimizer step trains on."""

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            count = int(mask.sum()) if mask is not None else ids.numel()
            step = self.state.global_step + 1  # the step this micro-batch belongs to
            tokens_by_step[step] = tokens_by_step.get(step, 0) + count
            return super().training_step(model, inputs, *args, **kwargs)

    class Turns(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            nonlocal start_rss
            start_rss = rss_mib()
            lockstep.ready()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lockstep.step_done(state.global_step)

    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    rows = read_examples(settings.examples)
    # Pre-tokenized with labels: TRL skips its own tokenization and label building and trains
    # on exactly kiln's token ids and loss mask.
    dataset = Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in rows],
            "labels": [
                [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
                for ids, mask in rows
            ],
        }
    )
    args = SFTConfig(
        output_dir=str(Path(settings.workdir) / "trl-run"),
        max_steps=settings.total_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_steps=settings.lr_warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=settings.sequence_length,
        packing=True,
        packing_strategy="bfd",
        # SFTConfig turns both on by default; kiln trains in float32 without checkpointing.
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=settings.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Turns()],
    )
    trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    timed = range(settings.warmup + 1, settings.total_steps + 1)
    return SideResult(
        side=TRL,
        tokens=sum(tokens_by_step.get(step, 0) for step in timed),
        seconds=lockstep.timed(settings.warmup),
        peak_rss_mib=peak_rss_mib(),
        start_rss_mib=start_rss,
        losses=losses,
        step_seconds=lockstep.step_seconds,
        notes={
            "packing": f"{args.packing_strategy}, padding-free "
            f"({len(trainer.train_dataset)} packed rows)",
            "attention": model.config._attn_implementation,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "version": f"trl {trl.__version__}",
        },
    )


def child_main(argv: Sequence[str]) -> int:
    """``SIDE SETTINGS.json RESULT.json``: train one side, write its measurements."""
    if len(argv) != 3 or argv[0] not in SIDES:
        print(f"usage: python -m kiln.bench.finetune {{{','.join(SIDES)}}} SETTINGS RESULT")
        return 2
    side, settings_path, result_path = argv
    settings = Settings.from_json(Path(settings_path).read_text(encoding="utf-8"))
    lockstep = Lockstep(settings.total_steps)
    train = train_kiln if side == KILN else train_trl
    result = train(settings, lockstep)
    Path(result_path).write_text(json.dumps(dataclasses.asdict(result)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
