"""Cold vs warm start: time to the first token loading a checkpoint (read, quantize or repack,
pack) against loading its exported artifact, each in a fresh process; and the time to just read
the artifact's bytes, the floor a warm start is measured against.

Both sides run one untimed process first, so kiln's CPU kernels are compiled and cached
(~/.cache/kiln/kernels) and the files are in the page cache for every timed run: what is
compared is the loading work, not the disk or the compiler. The read is timed the same way (in
a fresh process too), so it is a page-cache read (memory bandwidth), not a disk read.

The same warm start and read are also timed from disk: the artifact's files are dropped from
the page cache (``posix_fadvise(DONTNEED)``) before each, so both read the disk, as a server
starting on a freshly pulled artifact may.

Each timed process reports two figures: the load (``LLM(...)`` returned: weights, tokenizer,
KV cache, engine) and the time to the first token (load plus one prefill step over a short
prompt: 4 tokens for SmolLM2). The load is what compares with reading the bytes: the
artifact's weights are mapped, not read, so the first step is where their pages are first
touched, and that step's compute is the same for both sides.
"""

from __future__ import annotations

import json
import os
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
from kiln import LLM, SamplingParams
import torch
model, options = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
llm = LLM(model, **options)
load = time.perf_counter() - start
llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_new_tokens=1))
print(json.dumps({"load_s": load, "ttft_s": time.perf_counter() - start}))
"""


# The read is timed in a fresh process started the same way as a warm start's (kiln and torch
# imported first), so that both find the page cache in the same state: read by the parent
# right after the files were dropped, the pages came back as fast, while a warm start ~1.5 s of
# process start later met, on a VM, a first touch ~0.1 s slower in about half the runs. The
# tokenizer's load is timed alone the same way, as a warm start does it (its compiled form) and
# as parsing tokenizer.json would: a fixed part of every warm start, whatever the size of the
# weights.
_SECONDS_CHILD = """
import sys, time
from pathlib import Path
import kiln, torch
import tokenizers
from kiln.bench.export_start import _read_seconds
from kiln.text.compiled_tokenizer import COMPILED_TOKENIZER_FILE, CompiledTokenizer
path, what = Path(sys.argv[1]), sys.argv[2]
if what == "read":
    print(_read_seconds(path))
else:
    start = time.perf_counter()
    if what == "tokenizer":
        CompiledTokenizer(path / COMPILED_TOKENIZER_FILE, path / "tokenizer.json")
    else:
        tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    print(time.perf_counter() - start)
"""


def _seconds_in_fresh_process(path: Path, what: str) -> float:
    """Seconds to read ``path``'s files (``what`` "read"), to load its compiled tokenizer
    ("tokenizer") or to parse its tokenizer.json ("tokenizer.json"), in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _SECONDS_CHILD, str(path), what],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the timed {what} failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


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


def _read_seconds(path: Path) -> float:
    """Seconds to read every byte of the files in the directory ``path``, in 16 MiB reads into
    one reused buffer (no allocation per read: the floor a load is compared with)."""
    view = memoryview(bytearray(1 << 24))
    start = time.perf_counter()
    for file in sorted(path.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def _evict(path: Path) -> None:
    """Drop the files in the directory ``path`` from the page cache (written back first: dirty
    pages stay), so that the next reader reads the disk. No privileges needed: it is advice on
    our own files."""
    for file in sorted(path.iterdir()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(model: str | None, quantize: str | None, repeats: int) -> int:
    from kiln.config import ModelConfig
    from kiln.export.writer import ExportOptions, export_artifact
    from kiln.text.compiled_tokenizer import COMPILED_TOKENIZER_FILE
    from kiln.weights.resolve import resolve_checkpoint

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    checkpoint = resolve_checkpoint(model)
    source = str(checkpoint.path)
    # The exported context: 2048 tokens, or the model's own limit where that is shorter.
    max_positions = ModelConfig.from_hf(checkpoint.config).max_position_embeddings
    sequence_length = min(2048, max_positions)
    cold_options: dict[str, object] = {"device": "cpu", "dtype": "float32", "quantize": quantize}
    times: dict[str, list[float]] = {}

    def timed(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-start-") as tmp:
        artifact = Path(tmp) / "artifact"
        start = time.perf_counter()
        manifest = export_artifact(
            source, artifact, ExportOptions(1, sequence_length, "fp32", quantize, "cpu")
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
        for _ in range(repeats):  # interleaved, so drift hits every figure alike
            load_s, ttft_s = _time_to_first_token(source, cold_options)
            timed("cold load", load_s)
            timed("cold", ttft_s)
            load_s, ttft_s = _time_to_first_token(str(artifact), {})
            timed("warm load", load_s)
            timed("warm", ttft_s)
            timed("read", _seconds_in_fresh_process(artifact, "read"))
            if (artifact / COMPILED_TOKENIZER_FILE).exists():
                timed("tokenizer", _seconds_in_fresh_process(artifact, "tokenizer"))
            timed("tokenizer.json", _seconds_in_fresh_process(artifact, "tokenizer.json"))
            _evict(artifact)
            load_s, ttft_s = _time_to_first_token(str(artifact), {})
            timed("disk warm load", load_s)
            timed("disk warm", ttft_s)
            _evict(artifact)
            timed("disk read", _seconds_in_fresh_process(artifact, "read"))
    median = {name: statistics.median(values) for name, values in times.items()}
    lines = [
        ("cold start (checkpoint -> first token)", "cold"),
        ("warm start (artifact -> first token)", "warm"),
        ("cold load (checkpoint -> LLM ready)", "cold load"),
        ("warm load (artifact -> LLM ready)", "warm load"),
        ("read the artifact's bytes (page cache)", "read"),
        ("load its compiled tokenizer (page cache)", "tokenizer"),
        ("parse its tokenizer.json (page cache)", "tokenizer.json"),
        ("from disk: warm start", "disk warm"),
        ("from disk: warm load", "disk warm load"),
        ("from disk: read the artifact's bytes", "disk read"),
    ]
    width = max(len(label) for label, _ in lines) + 1
    for label, name in lines:
        if name not in median:  # a tokenizer that could not be compiled
            continue
        print(f"{label + ':':<{width}} {median[name]:.3g} s  (runs: {_runs(times[name])})")
    print(
        f"cold / warm: {median['cold'] / median['warm']:.2f}x | page cache: warm / read "
        f"{median['warm'] / median['read']:.1f}x, warm load / read "
        f"{median['warm load'] / median['read']:.1f}x | from disk: warm / read "
        f"{median['disk warm'] / median['disk read']:.1f}x, warm load / read "
        f"{median['disk warm load'] / median['disk read']:.1f}x"
    )
    return 0


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)
