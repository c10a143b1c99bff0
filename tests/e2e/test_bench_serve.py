"""`kiln bench serve` against a real `kiln serve` on loopback (stories260K): every metric,
token counts equal to the server's own counters, the TGI and chat APIs, a sweep, a server
killed mid-run, the HTML report rendered by headless Chromium, compare and the Locust file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kiln.cli.main import main
from kiln.loadtest.svg import PALETTE
from server_harness import Server, kiln_serve


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        name: float(value)
        for name, value in re.findall(r"^(kiln_\w+_tokens) (\S+)$", text, flags=re.MULTILINE)
    }


def _bench(server: Server, tmp_path: Path, name: str, *flags: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    code = main(
        [
            "bench",
            "serve",
            "--endpoint",
            server.url,
            "--no-progress",
            "--json",
            str(out),
            *flags,
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def server(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with kiln_serve(
        stories_dir, tmp_path_factory.mktemp("serve"), "--chat-template", "chatml"
    ) as running:
        yield running


def test_every_metric_and_token_counts_equal_the_servers(server: Server, tmp_path: Path) -> None:
    """The tutorial's scenario scaled down: users, 104 input tokens, fixed output length."""
    before = _counters(server.url)
    doc = _bench(
        server,
        tmp_path,
        "run",
        "--users",
        "4",
        "--duration",
        "3",
        "--input-tokens",
        "104",
        "--max-new-tokens",
        "12",
        "--price-per-hour",
        "0.7582",
        "--slo-ttft",
        "60000",
        "--slo-tpot",
        "60000",
        "--html",
        str(tmp_path / "run.html"),
    )
    after = _counters(server.url)
    # Every request the tool sent (warm-up included) against the server's own counters.
    requests = doc["requests"]
    assert all(r["error"] is None for r in requests)
    assert sum(r["input_tokens"] for r in requests) == (
        after["kiln_prompt_tokens"] - before["kiln_prompt_tokens"]
    )
    assert sum(r["output_tokens"] for r in requests) == (
        after["kiln_generation_tokens"] - before["kiln_generation_tokens"]
    )
    # Exact prompt lengths by the model's tokenizer, exact output lengths by ignore_eos.
    assert set(doc["input_lens"]) == {104} and set(doc["output_lens"]) == {12}
    assert doc["input_tokens_source"] == "usage" and doc["output_tokens_source"] == "usage"
    assert doc["num_warmup_requests"] == 1 and doc["completed"] >= 4 and doc["failed"] == 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            assert doc[f"{stat}_{metric}_ms"] > 0, f"{stat}_{metric}_ms"
    assert doc["p99_e2el_ms"] >= doc["p50_e2el_ms"] >= doc["p50_ttft_ms"]
    for key in (
        "requests_per_minute",
        "output_tokens_per_minute",
        "total_tokens_per_minute",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ):
        assert doc[key] > 0, key
    assert doc["total_tokens_per_minute"] == pytest.approx(
        doc["output_tokens_per_minute"] * (104 + 12) / 12
    )
    assert doc["request_goodput"] == pytest.approx(doc["request_throughput"])
    assert doc["cost_per_1m_output_tokens"] == pytest.approx(
        0.7582 / (doc["output_tokens_per_minute"] * 60) * 1e6
    )
    # ITLs of each request add up to the time between its first and last token events: at most
    # 11 gaps for 12 tokens (fewer when the first event carried two tokens, as a detokenizer
    # holding back an incomplete character does), within the request's E2E minus its TTFT.
    rows = zip(doc["itls"], doc["ttfts"], doc["e2els"], strict=True)
    for itls, ttft, e2e in rows:
        assert 1 <= len(itls) <= 11 and all(gap >= 0 for gap in itls)
        assert sum(itls) <= e2e - ttft + 1e-6
    assert (tmp_path / "run.html").read_text().count('<svg class="plot"') == 6


def test_tgi_api_and_multi_turn_chat(server: Server, tmp_path: Path) -> None:
    tgi = _bench(
        server,
        tmp_path,
        "tgi",
        "--api",
        "tgi",
        "--users",
        "2",
        "--num-requests",
        "4",
        "--max-new-tokens",
        "8",
    )
    assert tgi["completed"] == 4 and tgi["failed"] == 0
    # TGI's final event reports the input length and the generated tokens.
    assert tgi["input_tokens_source"] == "usage" and set(tgi["input_lens"]) == {104}
    assert all(1 <= n <= 8 for n in tgi["output_lens"])

    chat = _bench(
        server,
        tmp_path,
        "chat",
        "--api",
        "openai-chat",
        "--workload",
        "chat",
        "--turns",
        "2",
        "--users",
        "2",
        "--num-requests",
        "6",
        "--max-new-tokens",
        "8",
    )
    assert chat["completed"] == 6 and chat["failed"] == 0
    by_turn: dict[int, list[int]] = {}
    for r in chat["requests"]:
        by_turn.setdefault(r["turn"], []).append(r["input_tokens"])
    # A second turn resends its conversation's first turn and answer: longer than it.
    assert set(by_turn) == {0, 1}
    assert min(by_turn[1]) > min(by_turn[0])


def test_sweep_stops_by_itself_and_its_report_renders(server: Server, tmp_path: Path) -> None:
    html = tmp_path / "sweep.html"
    doc = _bench(
        server,
        tmp_path,
        "sweep",
        "--sweep",
        "--rate",
        "2",
        "--arrivals",
        "constant",
        "--sweep-max-steps",
        "2",
        "--duration",
        "2",
        "--max-new-tokens",
        "8",
        "--warmup-requests",
        "0",
        "--html",
        str(html),
    )
    assert doc["sweep"] and 1 <= len(doc["levels"]) <= 2 and doc["sweep_stop_reason"]
    assert [lv["shape"]["rate"] for lv in doc["levels"]] == [2.0, 4.0][: len(doc["levels"])]
    _assert_renders_with_plots(html, tmp_path, num_plots=6 + 2 * (len(doc["levels"]) > 1))


def test_server_killed_mid_run_gives_errors_and_a_partial_report(
    stories_dir: Path, tmp_path: Path
) -> None:
    with kiln_serve(stories_dir, tmp_path) as server:
        out = tmp_path / "killed.json"
        bench = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "bench",
                "serve",
                "--endpoint",
                server.url,
                "--users",
                "3",
                "--duration",
                "60",
                "--max-new-tokens",
                "32",
                "--no-progress",
                "--json",
                str(out),
                "--html",
                str(tmp_path / "killed.html"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        try:
            # Kill the server once it has generated for a while under the load.
            deadline = time.monotonic() + 60
            while _counters(server.url)["kiln_generation_tokens"] < 100:
                assert bench.poll() is None, bench.stdout.read().decode()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the load never reached the server"
                time.sleep(0.2)
            server.process.kill()
            server.process.wait()
            output, _ = bench.communicate(timeout=120)
        finally:
            if bench.poll() is None:
                bench.kill()
    text = output.decode()
    assert "Traceback" not in text, text
    assert bench.returncode == 0, text  # some requests completed before the kill
    doc = json.loads(out.read_text())
    assert doc["completed"] > 0 and doc["failed"] > 0
    assert set(doc["errors_by_kind"]) <= {"connect", "disconnected", "incomplete_stream"}
    assert "failed in a row" in (doc["stopped_early"] or "")
    assert (tmp_path / "killed.html").is_file()


def test_refuses_a_remote_target(capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.1 is TEST-NET-1: never this machine, and resolving it needs no DNS.
    assert main(["bench", "serve", "--endpoint", "http://192.0.2.1:8080"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_compare_and_locustfile(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    a = _bench(
        server, tmp_path, "a", "--users", "1", "--num-requests", "2", "--max-new-tokens", "4"
    )
    b = _bench(
        server, tmp_path, "b", "--users", "2", "--num-requests", "2", "--max-new-tokens", "4"
    )
    assert a["completed"] == b["completed"] == 2
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    shown = capsys.readouterr().out
    completed = next(line for line in shown.splitlines() if "requests completed" in line)
    assert re.findall(r"[\d.]+x?", completed) == ["2", "2", "1.00x"]
    assert "requests per minute" in shown

    locustfile = tmp_path / "locustfile.py"
    assert (
        main(
            [
                "bench",
                "locustfile",
                "--output",
                str(locustfile),
                "--endpoint",
                server.url,
                "--num-prompts",
                "5",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    source = locustfile.read_text()
    compile(source, str(locustfile), "exec")
    # The prompts and the body builder run without Locust: check them against the server.
    head = source.split("\nclass LLMUser")[0].replace(
        "from locust import HttpUser, constant, task\n", ""
    )
    namespace: dict[str, Any] = {}
    exec(compile(head, str(locustfile), "exec"), namespace)
    assert len(namespace["PROMPTS"]) == 5
    body = namespace["request_body"](namespace["PROMPTS"][0])
    del body["stream_options"]  # only allowed on a stream; a plain answer carries usage anyway
    response = httpx.post(
        server.url + namespace["PATH"], json={**body, "stream": False}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 104


@pytest.mark.slow
def test_locustfile_runs_under_locust(server: Server, tmp_path: Path) -> None:
    """Needs `pip install locust` (not a test dependency: it is heavy)."""
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if locust is None:
        pytest.skip("locust is not installed")
    file = tmp_path / "locustfile.py"
    assert (
        main(
            [
                "bench",
                "locustfile",
                "--output",
                str(file),
                "--endpoint",
                server.url,
                "--num-prompts",
                "5",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    result = subprocess.run(
        [
            locust,
            "-f",
            str(file),
            "--host",
            server.url,
            "--headless",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "5s",
            "--csv",
            str(tmp_path / "loc"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    stats = (tmp_path / "loc_stats.csv").read_text()
    assert "/v1/completions" in stats and "TTFT" in stats, result.stderr[-2000:]


# --- rendering in headless Chromium ------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("chromium is not installed (.ci/run installs it: apt-get install -y chromium)")


def _assert_renders_with_plots(html: Path, tmp_path: Path, num_plots: int) -> None:
    text = html.read_text()
    # Self-contained: nothing to fetch (the SVG namespace is a name, not a download).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    chromium = _chromium()
    # No network: every connection goes to a proxy that is not there.
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--proxy-server=127.0.0.1:9",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count('<svg class="plot"') == num_plots
    assert "<polyline" in dom and "<circle" in dom
    png = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1300,3600", f"--screenshot={png}", html.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(png) as image:
        width, height = image.size
        counts = {colour: n for n, colour in image.convert("RGB").getcolors(width * height)}
    colour = tuple(int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    drawn = counts.get(colour, 0)
    # The first series' colour is drawn only by plot lines, markers and legends: thousands of
    # pixels when the plots are shown, none when they are not.
    assert drawn > 2000, f"{drawn} plot pixels in a {width}x{height} screenshot"
