"""Cold vs warm start: time to the first token loading a checkpoint (read, quantize or repack,
pack) against loading its exported artifact, each in a fresh process; and the time to just read
the artifact's bytes, the floor a warm start is measured against.

Both sides run one untimed process first, so kiln's CPU kernels are compiled and cached
(~/.cache/kiln/kernels) and the files are in the page cache for every timed run: what is
compared is the loading work, not the disk or the compiler. The read is timed the same way, so
it is a page-cache read (memory bandwidth), not a disk read.

Each timed process reports two figures: the load (``LLM(...)`` returned: weights, tokenizer,
KV cache, engine) and the time to the first token (load plus one prefill step over a 5-token
prompt). The load is what compares with reading the bytes: the artifact's weights are mapped,
not read, so the first step is where their pages are first touched, and that step's compute
is the same for both sides.
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
load = time.perf_counter() - start
llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_new_tokens=1))
print(json.dumps({"load_s": load, "ttft_s": time.perf_counter() - start}))
"""


def _time_to_first_token(model: str, options: dict[str, object]) -> tuple[float, float]:
    """Seconds to a loaded model and to its first token, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, model, json.dumps(options)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the timed process failed:\n{result.stderr[-2000:]}")
    times = json.loads(result.stdout.strip().splitlines()[-1])
    return float(times["load_s"]), float(times["ttft_s"])


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
        cold, warm, cold_load, warm_load = [], [], [], []
        for _ in range(repeats):  # interleaved, so drift hits both sides alike
            load_s, ttft_s = _time_to_first_token(source, cold_options)
            cold_load.append(load_s)
            cold.append(ttft_s)
            load_s, ttft_s = _time_to_first_token(str(artifact), {})
            warm_load.append(load_s)
            warm.append(ttft_s)
        reads = [_read_seconds(artifact) for _ in range(repeats)]
    cold_s, warm_s, read_s = (statistics.median(x) for x in (cold, warm, reads))
    cold_load_s, warm_load_s = statistics.median(cold_load), statistics.median(warm_load)
    print(f"cold start (checkpoint -> first token): {cold_s:.3f} s  (runs: {_runs(cold)})")
    print(f"warm start (artifact -> first token):   {warm_s:.3f} s  (runs: {_runs(warm)})")
    print(
        f"cold load (checkpoint -> LLM ready):    {cold_load_s:.3f} s  (runs: {_runs(cold_load)})"
    )
    print(
        f"warm load (artifact -> LLM ready):      {warm_load_s:.3f} s  (runs: {_runs(warm_load)})"
    )
    print(f"read the artifact's bytes (page cache): {read_s:.4f} s  (runs: {_runs(reads)})")
    print(
        f"cold / warm: {cold_s / warm_s:.2f}x | warm / read: {warm_s / read_s:.1f}x | "
        f"warm load / read: {warm_load_s / read_s:.1f}x"
    )
    return 0


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)
