"""`kiln finetune --resume` after a real kill -9: the console script is SIGKILLed mid-run (as
soon as a checkpoint is being written, when that can be caught), resumed, and its losses from
the metrics JSONL equal those of an uninterrupted run; a half-written checkpoint is never
loaded. The uninterrupted run takes its settings from a YAML --config file, so this also checks
that the file's fields mean what the flags mean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

KILN = Path(sys.executable).with_name("kiln")
DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
MAX_STEPS = 20  # room for 10 steps after the newest checkpoint a kill can leave (6)
SAVE_EVERY = 3
SETTINGS = {
    "sequence-length": 128,
    "max-steps": MAX_STEPS,
    "batch-size": 2,
    "grad-accum": 2,
    "lora-r": 4,
    "lora-dropout": 0.1,  # dropout: the RNG state must come back with the checkpoint
    "lr": 1e-3,
    "warmup-steps": 3,
    "eval-fraction": 0.1,
    "save-every": SAVE_EVERY,
    "seed": 5,
    "threads": 1,
}


def _command(*args: str) -> list[str]:
    command = [str(KILN)] if KILN.is_file() else [sys.executable, "-m", "kiln.cli.main"]
    return [*command, *args]


def _flags() -> list[str]:
    return [part for key, value in SETTINGS.items() for part in (f"--{key}", str(value))]


def _losses(out: Path) -> dict[int, float]:
    """step -> training loss, from the metrics JSONL (one line per step, checked)."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in losses, f"step {record['step']} logged twice"
            losses[record["step"]] = record["loss"]
    return losses


def _logged_steps(out: Path) -> int:
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in text.splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _kill_mid_run(args: list[str], out: Path) -> str | None:
    """Start ``kiln finetune``; SIGKILL it while a checkpoint is being written (its temporary
    directory exists) after the second checkpoint, or, if no write is caught in time, as soon
    as step 8 is logged. Returns the temporary directory's name when the kill caught one."""
    process = subprocess.Popen(
        _command(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = out / "checkpoints"
    caught = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            step = _logged_steps(out)
            if step >= 2 * SAVE_EVERY and checkpoints.is_dir():
                temporary = [e.name for e in os.scandir(checkpoints) if e.name.startswith(".tmp")]
                if temporary:
                    caught = temporary[0]
                    break
            if step >= 8:
                break
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return caught


def test_kill_9_then_resume_gives_the_same_losses(stories_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "dolly.jsonl"
    lines = (DOLLY / "databricks-dolly-15k.head.jsonl").read_text().splitlines()[:60]
    data.write_text("\n".join(lines) + "\n")
    common = ["--model", str(stories_dir), "--data", str(data)]

    # The uninterrupted run, its settings from a YAML config file.
    config = tmp_path / "finetune.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in SETTINGS.items()))
    full_out = tmp_path / "full"
    full = subprocess.run(
        _command("finetune", *common, "--output", str(full_out), "--config", str(config)),
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr
    reference = _losses(full_out)
    assert list(reference) == list(range(1, MAX_STEPS + 1))

    out = tmp_path / "killed"
    args = ["finetune", *common, "--output", str(out), *_flags()]
    caught = _kill_mid_run(args, out)
    assert not (out / "model.safetensors").exists()  # it never got to the export
    complete = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert complete, "killed before the first checkpoint"
    expected_step = int(complete[-1].removeprefix("step-"))
    if caught is not None and (out / "checkpoints" / caught).exists():
        # The kill landed mid-write: the newer, half-written checkpoint must be passed over.
        assert int(caught.rsplit("-", 1)[1]) > expected_step

    resumed = subprocess.run(
        _command(*args, "--resume"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {expected_step}\n" in resumed.stdout
    assert expected_step + 10 <= MAX_STEPS
    losses = _losses(out)
    assert list(losses) == list(range(1, MAX_STEPS + 1))
    next_ten = range(expected_step + 1, expected_step + 11)
    assert [losses[s] for s in next_ten] == pytest.approx(
        [reference[s] for s in next_ten], abs=1e-5
    )
    # ...and every other step too, up to the end.
    assert [losses[s] for s in losses] == pytest.approx(list(reference.values()), abs=1e-5)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
