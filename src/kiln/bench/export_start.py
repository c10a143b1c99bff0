"""Cold vs warm start: time to the first token loading a checkpoint (read, quantize or repack,
pack) against loading its exported artifact, each in a fresh process; and the time to just read
the artifact's bytes, the floor a warm start is measured against.

Both sides run one untimed process first, so kiln's CPU kernels are compiled and cached
(~/.cache/kiln/kernels) and the files are in the page cache for every timed run: what is
compared is the loading work, not the disk or the compiler.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs in a fresh interpreter: torch and kiln are imported before the clock starts, so import
# time (the same on both sides) is not counted.
_CHILD = """
import json, sys, time
import torch
from kiln import LLM, SamplingParams
model, options = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
llm = LLM(model, **options)
llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_new_tokens=1))
print(json.dumps({"ttft_s": time.perf_counter() - start}))
"""


def _time_to_first_token(model: str, options: dict[str, object]) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, model, json.dumps(options)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the timed process failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["ttft_s"])


def _read_seconds(directory: Path) -> float:
    start = time.perf_counter()
    for path in sorted(directory.iterdir()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - start


def run(model: str | None, quantize: str | None, repeats: int) -> int:
    from kiln.export.writer import ExportOptions, export_artifact
    from kiln.weights.resolve import resolve_checkpoint

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    source = str(resolve_checkpoint(model).path)
    cold_options: dict[str, object] = {"device": "cpu", "dtype": "float32", "quantize": quantize}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-start-") as tmp:
        artifact = Path(tmp) / "artifact"
        start = time.perf_counter()
        manifest = export_artifact(
            source, artifact, ExportOptions(1, 2048, "fp32", quantize, "cpu")
        )
        export_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in artifact.iterdir())
        print(
            f"model: {source} | quantization: {manifest.quantization} "
            f"({len(manifest.quantized_layers)} packed layers) | artifact: {size / 2**20:.1f} MiB"
            f" | export took {export_s:.2f} s"
        )
        _time_to_first_token(source, cold_options)  # untimed: kernels compiled, files cached
        _time_to_first_token(str(artifact), {})
        cold, warm = [], []
        for _ in range(repeats):  # interleaved, so drift hits both sides alike
            cold.append(_time_to_first_token(source, cold_options))
            warm.append(_time_to_first_token(str(artifact), {}))
        reads = [_read_seconds(artifact) for _ in range(repeats)]
    cold_s, warm_s, read_s = (statistics.median(x) for x in (cold, warm, reads))
    print(f"cold start (checkpoint -> first token): {cold_s:.3f} s  (runs: {_runs(cold)})")
    print(f"warm start (artifact -> first token):   {warm_s:.3f} s  (runs: {_runs(warm)})")
    print(f"read the artifact's bytes:              {read_s:.4f} s  (runs: {_runs(reads)})")
    print(f"cold / warm: {cold_s / warm_s:.2f}x | warm / read: {warm_s / read_s:.1f}x")
    return 0


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)
