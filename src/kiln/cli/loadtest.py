"""`kiln bench serve | compare | locustfile`: load-test any TGI- or OpenAI-compatible server.

Thin wrappers: the flags become a :class:`kiln.loadtest.session.BenchOptions`; the work is in
:mod:`kiln.loadtest`, which talks HTTP only.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.cli.args import add_command

if TYPE_CHECKING:
    from kiln.loadtest.session import BenchOptions


def add_loadtest_commands(benches: Any) -> None:
    """Register `serve`, `compare` and `locustfile` under `kiln bench`. NOTE: `compare` is
    built by hand because its two files are positional (`kiln bench compare A.json B.json`),
    which the typed-function builder (flags only) does not make."""
    add_command(benches, bench_serve, "serve")
    doc = inspect.getdoc(bench_compare) or ""
    parser = benches.add_parser("compare", help=doc.splitlines()[0], description=doc)
    parser.add_argument("a", metavar="A.json", help="the first results file (A)")
    parser.add_argument("b", metavar="B.json", help="the second results file (B)")
    parser.set_defaults(_command=bench_compare, _groups={})
    add_command(benches, bench_locustfile, "locustfile")


def bench_serve(
    endpoint: str = "http://127.0.0.1:8080",
    api: str = "openai-completions",
    model: str | None = None,
    tokenizer: str | None = None,
    users: int | None = None,
    rate: float | None = None,
    arrivals: str = "poisson",
    sweep: bool = False,
    sweep_factor: float = 2.0,
    sweep_max_steps: int = 8,
    sweep_max_error_rate: float = 0.05,
    sweep_latency_factor: float = 4.0,
    duration: float | None = None,
    num_requests: int | None = None,
    warmup_requests: int = 1,
    warmup_seconds: float = 0.0,
    drain_seconds: float = 60.0,
    request_timeout: float = 300.0,
    max_consecutive_failures: int = 50,
    workload: str = "random",
    prompts_file: str | None = None,
    dolly_dir: str | None = None,
    turns: int = 3,
    system: str | None = None,
    input_tokens: int = 104,
    input_tokens_stddev: float = 0.0,
    max_new_tokens: int = 128,
    ignore_eos: bool = True,
    temperature: float | None = None,
    seed: int = 0,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
    price_per_hour: float | None = None,
    json: str | None = None,
    html: str | None = None,
    allow_remote: bool = False,
    progress: bool = True,
) -> int:
    """Load-test a running server (kiln, TGI, vLLM, llama.cpp's server, Ollama) over HTTP.

    Streams every request and reports TTFT, TPOT (after the first token), inter-token latency,
    end-to-end latency (mean/p50/p90/p99), requests and tokens per minute (output only, and
    input+output as the tutorials count), errors by kind, goodput within --slo-ttft/--slo-tpot
    and, with --price-per-hour, the cost of 1M tokens. Token counts are the server's usage
    where it reports them, else counted. Warm-up requests are left out of the figures. The run
    ends by itself (--duration or --num-requests, then at most --drain-seconds); a server that
    dies mid-run gives errors and a partial report.

    Args:
        endpoint: the server's base URL. Only this machine unless --allow-remote.
        api: tgi (/generate_stream), openai-chat (/v1/chat/completions) or openai-completions
            (/v1/completions).
        model: the model name for OpenAI APIs (default: the first one /v1/models lists).
        tokenizer: a model directory (or tokenizer.json) to count tokens with (default: the
            directory a local server reports at /v1/models, when it has a tokenizer.json).
        users: closed-loop users, each sending its next request when its answer ends
            (default 10 when --rate is not given).
        rate: open-loop arrivals, requests per second.
        arrivals: with --rate: poisson or constant gaps.
        sweep: raise the load step by step (x --sweep-factor) from --rate or --users until the
            knee: error rate, TTFT or throughput gain; each step lasts --duration.
        sweep_factor: load multiplier between sweep steps.
        sweep_max_steps: the most sweep steps.
        sweep_max_error_rate: stop the sweep after a step with more failures than this.
        sweep_latency_factor: stop the sweep after a step whose median TTFT is this many times
            the first step's.
        duration: seconds of measured load (default 60 unless --num-requests is given).
        num_requests: measured requests to send.
        warmup_requests: requests sent one by one before the load, not measured.
        warmup_seconds: seconds at the start of the load whose requests are not measured.
        drain_seconds: once sending stops, how long to wait for answers still streaming.
        request_timeout: seconds one request may take before it counts as a timeout.
        max_consecutive_failures: stop early after this many failed requests in a row.
        workload: random (exact --input-tokens), file (--prompts-file), dolly (the Dolly
            records, each asking for its reference answer's length), or chat (multi-turn
            conversations of --turns turns that grow turn by turn).
        prompts_file: a .jsonl (strings, or objects with prompt/text/instruction/messages) or
            a text file with one prompt per line.
        dolly_dir: the directory of Dolly *.jsonl records (default: ../shared/data/dolly).
        turns: user turns per conversation in the chat workload.
        system: a system message for the chat workload.
        input_tokens: prompt length of the random workload, in the model's tokens.
        input_tokens_stddev: spread of the random prompt lengths (0: all the same).
        max_new_tokens: tokens to ask for per request (for Dolly, the most).
        ignore_eos: ask for exactly --max-new-tokens where the API allows it.
        temperature: sampling temperature (default: the server's).
        seed: seed of the prompts and Poisson arrivals.
        slo_ttft: goodput objective for TTFT, in milliseconds.
        slo_tpot: goodput objective for TPOT, in milliseconds.
        price_per_hour: the instance's price in $/hour, for the cost per 1M tokens.
        json: write the results (vllm bench serve's field names) to this file.
        html: write a self-contained HTML report with plots to this file.
        allow_remote: allow a target that is not this machine.
        progress: show the live progress line (on a terminal).
    """
    from kiln.loadtest.metrics import Slo
    from kiln.loadtest.runner import RunLimits, SweepRule
    from kiln.loadtest.session import BenchOptions, run_bench

    if duration is None and num_requests is None:
        duration = 60.0
    options = BenchOptions(
        endpoint=endpoint,
        api=api,
        model=model,
        tokenizer=tokenizer,
        users=users,
        rate=rate,
        arrivals=arrivals,
        sweep=sweep,
        sweep_rule=SweepRule(
            factor=sweep_factor,
            max_steps=sweep_max_steps,
            max_error_rate=sweep_max_error_rate,
            latency_factor=sweep_latency_factor,
        ),
        limits=RunLimits(
            duration=duration,
            num_requests=num_requests,
            warmup_requests=warmup_requests,
            warmup_seconds=warmup_seconds,
            drain_seconds=drain_seconds,
            max_consecutive_failures=max_consecutive_failures,
        ),
        request_timeout=request_timeout,
        workload=workload,
        prompts_file=prompts_file,
        dolly_dir=dolly_dir,
        turns=turns,
        system=system,
        input_tokens=input_tokens,
        input_tokens_stddev=input_tokens_stddev,
        max_new_tokens=max_new_tokens,
        ignore_eos=ignore_eos,
        temperature=temperature,
        seed=seed,
        slo=Slo(
            ttft=slo_ttft / 1e3 if slo_ttft is not None else None,
            tpot=slo_tpot / 1e3 if slo_tpot is not None else None,
        ),
        price_per_hour=price_per_hour,
        json_path=json,
        html_path=html,
        allow_remote=allow_remote,
        progress=progress,
    )
    doc = run_bench(options)
    return 0 if doc["completed"] > 0 else 1


def bench_compare(a: str, b: str) -> int:
    """Two `kiln bench serve --json` results side by side, with B/A for each figure."""
    from rich.console import Console

    from kiln.errors import ConfigError
    from kiln.loadtest.compare import compare_table
    from kiln.loadtest.results import read_results

    try:
        doc_a, doc_b = read_results(Path(a)), read_results(Path(b))
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from e
    Console().print(compare_table(doc_a, doc_b, Path(a).name, Path(b).name))
    return 0


def bench_locustfile(
    output: str = "locustfile.py",
    endpoint: str = "http://127.0.0.1:8080",
    api: str = "openai-completions",
    model: str | None = None,
    tokenizer: str | None = None,
    workload: str = "random",
    prompts_file: str | None = None,
    dolly_dir: str | None = None,
    input_tokens: int = 104,
    input_tokens_stddev: float = 0.0,
    max_new_tokens: int = 128,
    ignore_eos: bool = True,
    num_prompts: int = 200,
    seed: int = 0,
) -> int:
    """Write a Locust file for the same workload as `kiln bench serve`.

    The prompts are built now (with the model's tokenizer for exact token counts) and written
    into the file, which needs only Locust to run: `locust -f FILE --host URL`.

    Args:
        output: the file to write.
        endpoint: the server the file's comment names as --host; asked for its model name and
            tokenizer when those are not given.
        api: tgi, openai-chat or openai-completions.
        model: the model name for OpenAI APIs (default: the first one /v1/models lists).
        tokenizer: a model directory (or tokenizer.json) to count tokens with.
        workload: random, file, dolly or chat (written as single turns).
        prompts_file: prompts for --workload file.
        dolly_dir: the directory of Dolly *.jsonl records.
        input_tokens: prompt length of the random workload, in the model's tokens.
        input_tokens_stddev: spread of the random prompt lengths.
        max_new_tokens: tokens to ask for per request.
        ignore_eos: ask for exactly --max-new-tokens where the API allows it.
        num_prompts: prompts written into the file (users cycle through them).
        seed: seed of the prompts.
    """
    from kiln.errors import ConfigError
    from kiln.loadtest.clients import CLIENTS, served_models
    from kiln.loadtest.locust import locustfile
    from kiln.loadtest.session import build_workload, find_tokenizer

    if api not in CLIENTS:
        raise ConfigError(f"--api must be one of {', '.join(CLIENTS)}")
    options = _workload_options(
        tokenizer,
        workload,
        prompts_file,
        dolly_dir,
        input_tokens,
        input_tokens_stddev,
        max_new_tokens,
        seed,
    )
    models = served_models(endpoint)
    model = model or (models[0]["id"] if models else None)
    counter = find_tokenizer(options, models)
    chat = api == "openai-chat"
    text = locustfile(
        build_workload(options, counter, chat),
        api,
        CLIENTS[api].path,
        model,
        max_new_tokens,
        ignore_eos,
        num_prompts,
        endpoint,
        Path(output).name,
    )
    Path(output).write_text(text)
    print(f"wrote {output}: locust -f {output} --host {endpoint}")
    return 0


def _workload_options(
    tokenizer: str | None,
    workload: str,
    prompts_file: str | None,
    dolly_dir: str | None,
    input_tokens: int,
    input_tokens_stddev: float,
    max_new_tokens: int,
    seed: int,
) -> BenchOptions:
    """BenchOptions carrying only what building a workload reads."""
    from kiln.loadtest.metrics import Slo
    from kiln.loadtest.runner import RunLimits, SweepRule
    from kiln.loadtest.session import BenchOptions

    options = BenchOptions(
        endpoint="",
        api="openai-completions",
        model=None,
        tokenizer=tokenizer,
        users=None,
        rate=None,
        arrivals="poisson",
        sweep=False,
        sweep_rule=SweepRule(),
        limits=RunLimits(),
        request_timeout=0.0,
        workload=workload,
        prompts_file=prompts_file,
        dolly_dir=dolly_dir,
        turns=1,
        system=None,
        input_tokens=input_tokens,
        input_tokens_stddev=input_tokens_stddev,
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        temperature=None,
        seed=seed,
        slo=Slo(),
        price_per_hour=None,
        json_path=None,
        html_path=None,
        allow_remote=False,
        progress=False,
    )
    options.check()
    return options
