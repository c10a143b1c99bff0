"""`kiln bench finetune` end to end on a tiny real Llama: both kiln and TRL's SFTTrainer train
in their own subprocesses and the JSON report holds both sides' measurements and the ratios."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.bench.finetune import missing_trl_packages

KILN = Path(sys.executable).with_name("kiln")
DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"

pytestmark = pytest.mark.slow


def test_bench_finetune_reports_both_sides(stories_dir: Path, tmp_path: Path) -> None:
    missing = missing_trl_packages()
    if missing:
        pytest.skip(f"the TRL side needs {', '.join(missing)} (pip install -e '.[bench-train]')")
    # stories260K's 512-token vocabulary spends about a token per character: records without a
    # context and with a short instruction keep answer tokens (a loss) within 96 tokens.
    rows = [json.loads(line) for line in (DOLLY / "databricks-dolly-15k.head.jsonl").open()]
    short = [r for r in rows if not r["context"] and len(r["instruction"]) <= 60][:24]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short))
    command = [str(KILN)] if KILN.is_file() else [sys.executable, "-m", "kiln.cli.main"]
    run = subprocess.run(
        [
            *command, "bench", "finetune", "--model", str(stories_dir), "--data", str(data),
            "--sequence-length", "96", "--batch-size", "2", "--steps", "2", "--warmup", "1",
            "--threads", "1", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)

    settings = report["settings"]
    assert (settings["sequence_length"], settings["steps"], settings["warmup"]) == (96, 2, 1)
    assert set(report["sides"]) == {"kiln", "trl"}
    for side in report["sides"].values():
        assert side["tokens"] > 0 and side["seconds"] > 0 and side["tokens_per_s"] > 0
        assert side["peak_rss_mib"] > 0
        assert side["start_rss_mib"] is None or side["start_rss_mib"] <= side["peak_rss_mib"]
        # Every step (warm-up included) was timed and logged a finite loss: both really trained.
        assert len(side["step_seconds"]) == 3
        assert side["seconds"] == pytest.approx(sum(side["step_seconds"][1:]))
        assert len(side["losses"]) == 3
        assert all(math.isfinite(loss) and loss > 0 for loss in side["losses"])
    ratios = report["ratios"]
    kiln, trl = report["sides"]["kiln"], report["sides"]["trl"]
    assert ratios["tokens_per_s"] == pytest.approx(kiln["tokens_per_s"] / trl["tokens_per_s"])
    assert ratios["peak_rss"] == pytest.approx(kiln["peak_rss_mib"] / trl["peak_rss_mib"])
    assert "padding-free" in trl["notes"]["packing"]
    assert len(report["load_average"]) == 3
