"""One `kiln bench serve` run from its options: check the target, find the model and its
tokenizer, build the workload and client, run the load (or the sweep) with a live line, then
print the summary and write the JSON and HTML files."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console

from kiln.errors import ConfigError
from kiln.loadtest.clients import APIS, CLIENTS, ApiClient, served_models
from kiln.loadtest.console import LiveLine, summary_tables, sweep_table
from kiln.loadtest.metrics import Slo
from kiln.loadtest.report_html import write_report
from kiln.loadtest.results import build_results, write_results
from kiln.loadtest.runner import Level, LoadShape, RunLimits, Runner, SweepRule, run_sweep
from kiln.loadtest.workload import (
    DEFAULT_DOLLY_DIR,
    ListWorkload,
    MultiTurnWorkload,
    RandomWorkload,
    TokenCounter,
    Workload,
    dolly_items,
    dolly_questions,
    read_prompt_file,
)

WORKLOADS = ("random", "file", "dolly", "chat")


@dataclass(frozen=True)
class BenchOptions:
    """Everything one run needs; the CLI's flags, validated by :meth:`check`."""

    endpoint: str
    api: str
    model: str | None
    tokenizer: str | None
    users: int | None
    rate: float | None
    arrivals: str
    sweep: bool
    sweep_rule: SweepRule
    limits: RunLimits
    request_timeout: float
    workload: str
    prompts_file: str | None
    dolly_dir: str | None
    turns: int
    system: str | None
    input_tokens: int
    input_tokens_stddev: float
    max_new_tokens: int
    ignore_eos: bool
    temperature: float | None
    seed: int
    slo: Slo
    price_per_hour: float | None
    json_path: str | None
    html_path: str | None
    allow_remote: bool
    progress: bool

    def check(self) -> None:
        if self.api not in APIS:
            raise ConfigError(f"--api must be one of {', '.join(APIS)}: got {self.api}")
        if self.workload not in WORKLOADS:
            raise ConfigError(f"--workload must be one of {', '.join(WORKLOADS)}")
        if self.users is not None and self.rate is not None:
            raise ConfigError("give --users (closed loop) or --rate (open loop), not both")
        if self.users is not None and self.users < 1:
            raise ConfigError("--users must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ConfigError("--rate must be positive")
        if self.arrivals not in ("poisson", "constant"):
            raise ConfigError("--arrivals must be poisson or constant")
        if self.limits.duration is None and self.limits.num_requests is None:
            raise ConfigError("give --duration or --num-requests: every run must end")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.workload == "file" and not self.prompts_file:
            raise ConfigError("--workload file needs --prompts-file")


def check_target(endpoint: str, allow_remote: bool) -> None:
    """Refuse a target that is not this machine unless ``allow_remote``: a load test is a
    flood of requests, and pointing one at someone else's server by mistake must not happen."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--endpoint must be an http(s) URL: got {endpoint!r}")
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ConfigError(f"--endpoint {parts.hostname}: cannot resolve it ({e})") from e
    addresses = {info[4][0] for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise ConfigError(
            f"--endpoint {parts.hostname} is not this machine ({', '.join(remote)}); "
            "pass --allow-remote to load-test a remote server"
        )


def find_tokenizer(options: BenchOptions, models: list[dict[str, Any]]) -> TokenCounter | None:
    """``--tokenizer``, else the directory a local server says it serves (``/v1/models``
    ``root``, as kiln and vLLM report it) when it holds a tokenizer.json."""
    if options.tokenizer:
        return TokenCounter.from_path(options.tokenizer)
    for entry in models:
        root = entry.get("root")
        if isinstance(root, str) and (Path(root) / "tokenizer.json").is_file():
            return TokenCounter.from_path(root)
    return None


def build_workload(options: BenchOptions, counter: TokenCounter | None, chat: bool) -> Workload:
    dolly_dir = Path(options.dolly_dir) if options.dolly_dir else DEFAULT_DOLLY_DIR
    if options.workload == "random":
        if counter is None:
            raise ConfigError(
                "random prompts of exact token counts need the model's tokenizer: pass "
                "--tokenizer DIR (a directory with tokenizer.json)"
            )
        return RandomWorkload(
            counter,
            options.input_tokens,
            options.input_tokens_stddev,
            options.max_new_tokens,
            chat,
            options.seed,
        )
    if options.workload == "file":
        assert options.prompts_file is not None
        items = read_prompt_file(Path(options.prompts_file))
        return ListWorkload(items, options.max_new_tokens, counter, chat, options.prompts_file)
    if options.workload == "dolly":
        items = dolly_items(counter, options.max_new_tokens, dolly_dir)
        return ListWorkload(items, options.max_new_tokens, counter, chat, f"Dolly ({dolly_dir})")
    return MultiTurnWorkload(
        dolly_questions(dolly_dir),
        options.turns,
        options.max_new_tokens,
        counter,
        chat,
        options.system,
    )


def run_bench(options: BenchOptions, console: Console | None = None) -> dict[str, Any]:
    """Run the load test; print the summary; write --json/--html; return the results."""
    options.check()
    check_target(options.endpoint, options.allow_remote)
    console = console or Console(stderr=False)
    models = served_models(options.endpoint)
    model = options.model or (models[0]["id"] if models else None)
    if options.api != "tgi" and model is None:
        raise ConfigError("the server lists no model at /v1/models: pass --model NAME")
    counter = find_tokenizer(options, models)
    client: ApiClient = CLIENTS[options.api](
        options.endpoint,
        model,
        counter,
        options.ignore_eos,
        options.temperature,
        options.request_timeout,
    )
    workload = build_workload(options, counter, client.counts_chat)
    first = LoadShape(
        users=options.users if options.rate is None else None,
        rate=options.rate,
        arrivals=options.arrivals,
    )
    if first.users is None and first.rate is None:
        first = LoadShape(users=10)
    notes = []
    if counter is None:
        notes.append("no tokenizer: input tokens are the server's usage where it reports them")
    if options.api == "tgi":
        notes.append("TGI has no ignore_eos: answers may end before --max-new-tokens")
    if options.api == "openai-chat":
        notes.append(
            "chat prompts: our input counts are the messages' text; usage adds the template"
        )
    console.print(
        f"kiln bench serve: {options.endpoint} ({options.api}, model {model or '-'}) | "
        f"{workload.describe()} | {options.max_new_tokens} max new tokens | "
        + ("sweep from " if options.sweep else "")
        + first.describe()
    )

    with LiveLine(console, options.progress) as live:
        live.level(first.describe())

        def on_level(level: Level) -> None:
            live.level(options.sweep_rule.next_shape(level.shape).describe())

        runner = Runner(
            client,
            workload,
            options.limits,
            options.slo,
            options.price_per_hour,
            live.add,
            options.seed,
        )
        if options.sweep:
            levels, stop_reason = asyncio.run(
                run_sweep(runner, first, options.sweep_rule, on_level)
            )
        else:
            levels, stop_reason = [asyncio.run(runner.run_level(first))], None
    notes.extend(client.notes)
    config = {
        "endpoint": options.endpoint,
        "backend": options.api,
        "model_id": model,
        "tokenizer_id": options.tokenizer
        or (str(counter.tokenizer.tokenizer_config.get("name_or_path", "")) if counter else None),
        "workload": workload.describe(),
        "max_new_tokens": options.max_new_tokens,
        "ignore_eos": options.ignore_eos and "ignore_eos" not in client.dropped,
        "slo_ttft_ms": options.slo.ttft * 1e3 if options.slo.ttft is not None else None,
        "slo_tpot_ms": options.slo.tpot * 1e3 if options.slo.tpot is not None else None,
        "limits": asdict(options.limits),
    }
    doc = build_results(config, levels, notes, stop_reason)
    if options.sweep:
        console.print(sweep_table(doc["levels"]))
        console.print(f"sweep stopped: {stop_reason}")
    title = f"{doc['load']}" + (" (best step)" if options.sweep else "")
    for table in summary_tables(doc, title):
        console.print(table)
    for level in levels:
        if level.stopped_early:
            console.print(f"[red]{level.shape.describe()}: {level.stopped_early}[/red]")
    for note in notes:
        console.print(f"note: {note}")
    if options.json_path:
        write_results(doc, Path(options.json_path))
        console.print(f"results: {options.json_path}")
    if options.html_path:
        write_report(doc, Path(options.html_path))
        console.print(f"report: {options.html_path}")
    sys.stdout.flush()
    return doc
