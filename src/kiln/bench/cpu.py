"""CPU speed of kiln vs llama.cpp (and transformers): same GGUF file, same thread count, one run.

Four rows, each measured with runs interleaved (kiln, llama.cpp, transformers, kiln, ...) so
that drift in the machine's speed (other tenants, frequency) hits every side alike; each cell
is the median and the min-max spread of ``repeats`` runs after one warm-up run:

- decode: single-stream greedy decode tokens/s in process (:func:`kiln.bench.decode.compare`);
  llama.cpp through ``llama-cpp-python``, transformers through ``generate`` on its own
  dequantized load of the GGUF.
- prefill: tokens/s of a 500-token prompt (kiln: time to its first token, prefix caching
  defeated by a different first token each run; llama.cpp: ``eval`` of the prompt; transformers:
  one forward).
- served, 1 and 16 streams: total output tokens/s of concurrent streamed ``/v1/completions``
  requests of 128 tokens each (``ignore_eos``), against ``kiln serve`` and llama.cpp's
  ``llama-server`` (16 slots), both running as subprocesses, through one client code path.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KILN = "kiln"
LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers"
PEERS = (KILN, LLAMA_CPP, TRANSFORMERS)

DECODE_TOKENS = 128
PREFILL_TOKENS = 500
SERVED_TOKENS = 128
SERVED_STREAMS = (1, 16)
SERVED_PROMPT = "Write a long story about a lighthouse keeper and the sea:"
SLOT_CONTEXT = 512
"""llama-server context per slot: the served prompt (~20 tokens) + 128 output tokens, rounded
up generously."""


# --- results and the table: pure ------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One side's measurements of one row: tokens/s of each run, or why there are none."""

    values: tuple[float, ...] = ()
    reason: str | None = None

    @classmethod
    def na(cls, reason: str) -> Cell:
        return cls(reason=reason)

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.values), max(self.values)


@dataclass
class Row:
    name: str
    cells: dict[str, Cell] = field(default_factory=dict)
    """By peer; a peer left out was not asked to run this row (shown as "-")."""


def format_value(value: float) -> str:
    """Tokens/s with as many digits as are meaningful for a run-to-run spread of a few %."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_cell(cell: Cell | None, note: int | None = None) -> str:
    """``median (min-max)``, ``n/a [note]`` or ``-`` (not run)."""
    if cell is None:
        return "-"
    if not cell.ok:
        return f"n/a [{note}]" if note is not None else "n/a"
    low, high = cell.spread
    return f"{format_value(cell.median)} ({format_value(low)}-{format_value(high)})"


def ratio(row: Row, numerator: str = KILN, denominator: str = LLAMA_CPP) -> str:
    """``numerator / denominator`` of the medians, or ``-`` when either has no measurement."""
    top, bottom = row.cells.get(numerator), row.cells.get(denominator)
    if top is None or bottom is None or not top.ok or not bottom.ok or bottom.median == 0:
        return "-"
    return f"{top.median / bottom.median:.2f}x"


def format_table(rows: Sequence[Row], peers: Sequence[str] = PEERS) -> str:
    """The rows as an aligned plain-text table, then a numbered note for each distinct reason a
    cell is n/a. A peer no row asked for (e.g. ``--skip-transformers``) gets no column."""
    peers = [p for p in peers if any(p in row.cells for row in rows)]
    notes: dict[str, int] = {}
    header = ["tokens/s: median (min-max)", *peers, f"{KILN}/{LLAMA_CPP}"]
    lines = [header]
    for row in rows:
        line = [row.name]
        for peer in peers:
            cell = row.cells.get(peer)
            note = None
            if cell is not None and not cell.ok:
                reason = f"{peer}: {_one_line(cell.reason or 'no result')}"
                note = notes.setdefault(reason, len(notes) + 1)
            line.append(format_cell(cell, note))
        line.append(ratio(row))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            part.ljust(width) if i == 0 else part.rjust(width)
            for i, (part, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    text += [f"[{number}] {reason}" for reason, number in notes.items()]
    return "\n".join(text)


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def interleave(
    runners: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, Cell]:
    """Run each runner ``warmup`` then ``repeats`` times, round-robin, and collect its results.

    A runner that raises becomes n/a (with the error) and is not run again: the other peers'
    cells still fill.
    """
    values: dict[str, list[float]] = {name: [] for name in runners}
    failed: dict[str, str] = {}
    for i in range(warmup + repeats):
        for name, run in runners.items():
            if name in failed:
                continue
            try:
                value = run()
            except Exception as e:  # any failure of a peer is a cell's n/a
                failed[name] = f"{type(e).__name__}: {e}"
                continue
            if i >= warmup:
                values[name].append(value)
    return {
        name: Cell.na(failed[name]) if name in failed else Cell(tuple(values[name]))
        for name in runners
    }


# --- streamed /v1/completions: token counting is pure ---------------------------------------


@dataclass
class StreamCount:
    """Output tokens of one streamed ``/v1/completions`` response, from its SSE lines.

    Both servers report ``usage.completion_tokens`` in a final chunk (kiln when asked with
    ``stream_options.include_usage``, llama-server always); that count is used for both. Text
    chunks are counted as a fallback only: a server may merge tokens into one chunk or hold
    back text that is not yet valid UTF-8, so chunks are not tokens.
    """

    usage_tokens: int | None = None
    text_chunks: int = 0
    done: bool = False

    def feed(self, line: str) -> None:
        """One line of the event stream (``data: {...}``, ``data: [DONE]``, blank...)."""
        if not line.startswith("data:"):
            return
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"the server streamed an error: {chunk['error']}")
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        self.text_chunks += sum(1 for c in chunk.get("choices") or [] if c.get("text"))

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.text_chunks


def completion_payload(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The one request body both servers get: greedy, exactly ``max_tokens`` tokens."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _stream_one(client: Any, url: str, payload: dict[str, Any]) -> int:
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {_one_line(body, 200)}")
        count = StreamCount()
        async for line in response.aiter_lines():
            count.feed(line)
    return count.tokens


async def _stream_all(url: str, payloads: list[dict[str, Any]]) -> tuple[float, list[int]]:
    import httpx

    limits = httpx.Limits(max_connections=len(payloads) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(_stream_one(client, url, p) for p in payloads))
        return time.perf_counter() - start, list(counts)


def served_runner(url: str, model: str, streams: int, tags: Iterator[int]) -> Callable[[], float]:
    """Total output tokens/s of ``streams`` concurrent streamed requests, first sent to last
    finished. Each request's prompt starts with a new number, so no run reuses another's
    cached prompt (kiln's prefix cache, llama-server's slot cache)."""

    def run() -> float:
        tag = next(tags)
        payloads = [
            completion_payload(model, f"{tag}-{i}. {SERVED_PROMPT}", SERVED_TOKENS)
            for i in range(streams)
        ]
        seconds, counts = asyncio.run(_stream_all(url, payloads))
        if any(c != SERVED_TOKENS for c in counts):
            print(f"  note: {url} returned {counts} tokens, not {SERVED_TOKENS} each")
        return sum(counts) / seconds

    return run


# --- in-process peers -----------------------------------------------------------------------


def prefill_prompts(
    vocab_size: int, length: int = PREFILL_TOKENS, seed: int = 0
) -> Iterator[list[int]]:
    """Endless ``length``-token prompts of random ids that differ in their first token, so that
    no prompt's prefix is cached from an earlier one."""
    rng = random.Random(seed)
    tail = [rng.randrange(100, vocab_size) for _ in range(length - 1)]
    for i in itertools.count():
        yield [100 + i % (vocab_size - 100), *tail]


def _timed_rate(tokens: int, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return tokens / (time.perf_counter() - start)


def kiln_prefill(llm: Any, prompts: Iterator[list[int]]) -> Callable[[], float]:
    from kiln.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)

    def run() -> float:
        prompt = next(prompts)
        return _timed_rate(len(prompt), lambda: llm.generate([prompt], params))

    return run


def load_llama_cpp(path: Path, threads: int, repack: bool = True) -> Any:
    """llama-cpp-python's ``Llama`` for ``path``; ``repack=False`` loads it without weight
    repacking (llama.cpp's extra buffer types: AMX, interleaved Q4_0), as llama-server's
    ``--no-repack`` does."""
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    defaults = bindings.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    # NOTE: Llama() takes no such argument; it reads the module's defaults while it loads.
    if not repack:
        bindings.llama_model_default_params = without_repacking
    try:
        # NOTE: one batch holds the whole 500-token prompt, as kiln's 2048-token step does.
        return Llama(
            str(path),
            n_ctx=1024,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    finally:
        bindings.llama_model_default_params = defaults


# Loads and runs a prompt and a few decode steps in a child process.
_REPACK_PROBE = """
import sys
from pathlib import Path
from kiln.bench.cpu import load_llama_cpp
llm = load_llama_cpp(Path(sys.argv[1]), int(sys.argv[2]))
llm.eval(llm.tokenize(b"The repacked weights run a prompt and a few decode steps"))
for token in (1, 2, 3):
    llm.eval([token])
"""


def llama_cpp_repack_failure(path: Path, threads: int) -> str | None:
    """None when llama.cpp runs ``path`` with its weight repacking, or how that failed.

    Probed in a child process, because the failure seen is a crash: on an Intel VM with AMX,
    llama-cpp-python 0.3.36 segfaulted in ``ggml_backend_amx_mul_mat`` on the first decode,
    taking the whole benchmark with it; without repacking it ran."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _REPACK_PROBE, str(path), str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"killed by signal {-done.returncode}"
    return f"exit {done.returncode}: {_one_line(done.stderr[-300:])}"


def llama_cpp_decoder(llm: Any) -> Callable[[int], int]:
    """Greedy decode of :data:`kiln.bench.decode.PROMPT` with llama.cpp's own forward; the
    argmax over its logits is the whole sampler, as kiln's greedy path is."""
    import numpy as np

    from kiln.bench.decode import PROMPT

    prompt = llm.tokenize(PROMPT.encode())
    vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
        return int(logits.argmax())

    def run(n: int) -> int:
        llm.reset()
        llm.eval(prompt)
        token = next_token()
        for _ in range(n - 1):
            llm.eval([token])
            token = next_token()
        return n

    return run


def llama_cpp_prefill(llm: Any, prompts: Iterator[list[int]]) -> Callable[[], float]:
    def run() -> float:
        prompt = next(prompts)

        def work() -> None:
            llm.reset()
            llm.eval(prompt)

        return _timed_rate(len(prompt), work)

    return run


def transformers_prefill(model: Any, prompts: Iterator[list[int]]) -> Callable[[], float]:
    import torch

    @torch.inference_mode()
    def forward(prompt: list[int]) -> None:
        # The next token needs the last position's logits only, as in kiln and llama.cpp.
        model(input_ids=torch.tensor([prompt]), logits_to_keep=1)

    def run() -> float:
        prompt = next(prompts)
        return _timed_rate(len(prompt), lambda: forward(prompt))

    return run


def _try(what: str, load: Callable[[], Any]) -> tuple[Any, str | None]:
    """``load()``, or None and why it failed: a peer that cannot load is n/a, not fatal."""
    try:
        return load(), None
    except Exception as e:
        reason = f"{what} failed: {type(e).__name__}: {e}"
        print(f"  {reason}")
        return None, reason


def in_process_rows(
    path: Path,
    threads: int,
    quantize: str | None,
    repeats: int,
    transformers: bool,
    repack: bool = True,
) -> list[Row]:
    """The decode and prefill rows: every peer loaded into this process."""
    import torch

    from kiln.bench.decode import compare, kiln_runner, load_transformers, transformers_runner
    from kiln.llm import LLM

    torch.set_num_threads(threads)
    print("loading kiln ...")
    llm = LLM(str(path), device="cpu", quantize=quantize)
    print("loading llama.cpp (llama-cpp-python) ...")
    lcpp, lcpp_reason = _try(
        "loading llama-cpp-python", lambda: load_llama_cpp(path, threads, repack)
    )
    hf = hf_reason = None
    if transformers:
        print("loading transformers (dequantized GGUF) ...")
        hf, hf_reason = _try("loading transformers", lambda: load_transformers(path, llm.dtype))

    decode = Row(f"decode, 1 stream, {DECODE_TOKENS} tokens (in process)")
    prefill = Row(f"prefill, {PREFILL_TOKENS}-token prompt (in process)")
    decoders = {KILN: kiln_runner(llm)}
    prefills = {KILN: kiln_prefill(llm, prefill_prompts(llm.config.vocab_size))}
    for peer, reason in ((LLAMA_CPP, lcpp_reason), (TRANSFORMERS, hf_reason)):
        if reason is not None:
            decode.cells[peer] = prefill.cells[peer] = Cell.na(reason)
    if lcpp is not None:
        decoders[LLAMA_CPP] = llama_cpp_decoder(lcpp)
        prefills[LLAMA_CPP] = llama_cpp_prefill(lcpp, prefill_prompts(llm.config.vocab_size))
    if hf is not None:
        hf_model, hf_tokenizer = hf
        decoders[TRANSFORMERS] = transformers_runner(hf_model, hf_tokenizer)
        prefills[TRANSFORMERS] = transformers_prefill(
            hf_model, prefill_prompts(llm.config.vocab_size)
        )

    print(f"measuring decode ({' / '.join(decoders)}, {repeats} runs each) ...")
    for result in compare(decoders, DECODE_TOKENS, repeats):
        decode.cells[result.name] = Cell(tuple(result.tokens_per_s))
    print(f"measuring prefill ({' / '.join(prefills)}, {repeats} runs each) ...")
    prefill.cells.update(interleave(prefills, repeats))
    return [decode, prefill]


# --- served peers ---------------------------------------------------------------------------


def kiln_serve_command(path: Path, port: int, threads: int, quantize: str | None) -> list[str]:
    """``kiln serve`` of the GGUF on loopback ``port``, with this interpreter's kiln."""
    command = [sys.executable, "-m", "kiln.cli.main", "serve", "--port", str(port)]
    command += ["--device", "cpu", "--threads", str(threads), "--model", str(path)]
    return command if quantize is None else [*command, "--quantize", quantize]


def served_model_name(url: str) -> str:
    """The model id a server answers to (what ``/v1/models`` lists first)."""
    import httpx

    response = httpx.get(f"{url}/v1/models", timeout=30.0)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


@contextmanager
def served_peers(
    path: Path,
    threads: int,
    quantize: str | None,
    llama_server: Path | None,
    llama_reason: str | None,
    repack: bool = True,
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """Both servers up at once (so that their runs can alternate): ({peer: base URL} of those
    that started, {peer: why not} of those that did not)."""
    from kiln.bench.llama_server import free_port, launched, server_command

    urls: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if llama_reason is not None:
        reasons[LLAMA_CPP] = llama_reason
    with ExitStack() as stack:
        starts: dict[str, Callable[[], str]] = {}
        port = free_port()
        command = kiln_serve_command(path, port, threads, quantize)
        starts[KILN] = lambda: stack.enter_context(launched(command, port, "kiln serve"))
        if llama_server is not None:
            lport = free_port()
            slots = max(SERVED_STREAMS)
            lcommand = server_command(
                llama_server, path, lport, threads, slots, SLOT_CONTEXT, repack
            )
            starts[LLAMA_CPP] = lambda: stack.enter_context(
                launched(lcommand, lport, "llama-server")
            )
        for peer, start in starts.items():
            print(f"starting {peer} server ...")
            try:
                urls[peer] = start()
            except Exception as e:  # a server that cannot start is n/a
                reasons[peer] = f"{type(e).__name__}: {e}"
                print(f"  {reasons[peer]}")
        yield urls, reasons


def served_rows(
    path: Path,
    threads: int,
    quantize: str | None,
    repeats: int,
    llama_server: Path | None,
    llama_reason: str | None,
    repack: bool = True,
) -> list[Row]:
    rows = [
        Row(f"served, {n} stream{'s' * (n > 1)} x {SERVED_TOKENS} tokens") for n in SERVED_STREAMS
    ]
    peers = served_peers(path, threads, quantize, llama_server, llama_reason, repack)
    with peers as (urls, reasons):
        models = {}
        for peer, url in urls.items():
            try:
                models[peer] = served_model_name(url)
            except Exception as e:
                reasons[peer] = f"GET /v1/models failed: {e}"
        tags = itertools.count()
        for row, streams in zip(rows, SERVED_STREAMS, strict=True):
            runners = {
                peer: served_runner(urls[peer], models[peer], streams, tags)
                for peer in (KILN, LLAMA_CPP)
                if peer in models
            }
            print(f"measuring {row.name} ({' / '.join(runners)}, {repeats} runs each) ...")
            row.cells.update(interleave(runners, repeats))
            for peer, reason in reasons.items():
                row.cells[peer] = Cell.na(reason)
    return rows


# --- the program ----------------------------------------------------------------------------


def resolve_gguf(model: str | None) -> Path:
    """The GGUF file both engines load: ``model``, or kiln's default model's file."""
    from kiln.errors import ConfigError
    from kiln.weights.resolve import default_model_path

    path = default_model_path() if model is None else Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ConfigError(
            f"kiln bench cpu needs a local .gguf file (llama.cpp reads only GGUF): {path}"
        )
    return path


def find_llama_server(explicit: str | None) -> tuple[Path | None, str | None]:
    """The llama-server binary (built on first use), or None and why there is none."""
    from kiln.bench.llama_server import LlamaServerUnavailable, find_or_build

    try:
        return find_or_build(explicit), None
    except LlamaServerUnavailable as e:
        print(f"llama-server unavailable: {e}")
        return None, f"llama-server unavailable: {e}"


def run(
    model: str | None,
    threads: int,
    repeats: int,
    quantize: str | None,
    skip_served: bool,
    skip_transformers: bool,
    llama_server: str | None,
) -> str:
    """Measure every row and return the report (header + table)."""
    path = resolve_gguf(model)
    header = (
        f"model: {path} | threads: {threads} (of {os.cpu_count()} CPUs) | quantize: "
        f"{quantize or 'as stored in the GGUF'} | {repeats} runs per cell after a warm-up, "
        f"interleaved {KILN}, {LLAMA_CPP}{'' if skip_transformers else ', ' + TRANSFORMERS}"
    )
    # A llama.cpp that crashes with its weight repacking runs without it, and the header says so.
    failure = None
    if importlib.util.find_spec("llama_cpp") is not None:
        failure = llama_cpp_repack_failure(path, threads)
    if failure is not None:
        header += (
            f"\nllama.cpp runs without weight repacking (with it, a probe run failed: {failure})"
        )
    print(header)
    # The (one-off, long) llama-server build comes first, before anything is measured.
    binary, reason = (None, None) if skip_served else find_llama_server(llama_server)
    # What else ran meanwhile decides how far the numbers can be trusted: shown beside them.
    load_before = load_average()
    repack = failure is None
    rows = in_process_rows(path, threads, quantize, repeats, not skip_transformers, repack)
    gc.collect()  # the in-process models go before the servers load theirs
    if not skip_served:
        rows += served_rows(path, threads, quantize, repeats, binary, reason, repack)
    load = f"system load average (1 min) before: {load_before}, after: {load_average()}"
    return f"{header}\n{load}\n\n{format_table(rows)}"


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # not available on this platform
        return "n/a"
