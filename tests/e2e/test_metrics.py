"""``/metrics`` through ``prometheus_client``: a real server on loopback (stories260K), scraped
in Prometheus' text format and in OpenMetrics, each parsed by ``prometheus_client``'s own
parsers; and multiprocess mode, where a second process's request counts reach the scrape."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kiln import LLM
from kiln.config.server import ServerConfig
from kiln.serving.metrics import RequestMetrics
from server_harness import kiln_serve, running_server

# Every metric family kiln served before prometheus_client, with its type: TGI's names (TGI's
# dashboards query them) and kiln's own. None may go missing or change type.
FAMILIES = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_queue_size": "gauge",
    "tgi_batch_current_size": "gauge",
    "kiln_requests_in_flight": "gauge",
    "kiln_model_switches": "counter",
    "kiln_model_load_failures": "counter",
    "kiln_model_status": "gauge",
    "kiln_kv_cache_blocks": "gauge",
    "kiln_kv_cache_blocks_used": "gauge",
    "kiln_kv_cache_usage": "gauge",
    "kiln_prefix_cache_queries": "counter",
    "kiln_prefix_cache_hits": "counter",
    "kiln_preemptions": "counter",
    "kiln_prompt_tokens": "counter",
    "kiln_generation_tokens": "counter",
    "kiln_time_to_first_token_seconds": "histogram",
    "kiln_time_per_output_token_seconds": "histogram",
    "kiln_queue_time_seconds": "histogram",
    "kiln_tokens_per_step": "histogram",
}
# A model name that the label escaping must carry through: a quote and a backslash.
MODEL_NAME = 'stories "260K" \\ test'
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def http(stories_dir: Path) -> Iterator[httpx.Client]:
    llm = LLM(str(stories_dir), kv_cache_memory=16 << 20)
    with (
        running_server(llm, ServerConfig(model_id=MODEL_NAME)) as url,
        httpx.Client(base_url=url, timeout=TIMEOUT_S) as client,
    ):
        yield client


def _scrape(client: httpx.Client) -> dict[str, tuple[str, list[Sample]]]:
    """The text format, parsed: family name -> (type, samples)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(response.text)}


def _sum(
    families: dict[str, tuple[str, list[Sample]]], family: str, suffix: str, **labels: str
) -> float:
    """A family's samples ``family + suffix`` with ``labels``, added up (0 when there is none,
    as for a label value not seen yet). NOTE: the parser names a counter's samples ``_total``
    whichever way the text wrote them."""
    return sum(
        s.value
        for s in families[family][1]
        if s.name == family + suffix and labels.items() <= s.labels.items()
    )


def test_text_format_parses_and_keeps_every_name_and_type(http: httpx.Client) -> None:
    families = _scrape(http)
    assert {name: kind for name, (kind, _) in families.items()} == FAMILIES
    # TGI's sample names, as TGI writes them: no `_total`, no `_created`.
    text = http.get("/metrics").text
    assert "\ntgi_request_count " in text and "_total" not in text and "_created" not in text


def test_counters_move_after_requests(http: httpx.Client) -> None:
    before = _scrape(http)
    ok = http.post("/generate", json={"inputs": "Once", "parameters": {"max_new_tokens": 5}})
    assert ok.status_code == 200
    invalid = http.post("/generate", json={"inputs": "", "parameters": {"max_new_tokens": 5}})
    assert invalid.status_code == 422
    after = _scrape(http)

    def moved(family: str, suffix: str = "_total", **labels: str) -> float:
        return _sum(after, family, suffix, **labels) - _sum(before, family, suffix, **labels)

    assert moved("tgi_request_count") == 2
    assert moved("tgi_request_success") == 1
    assert moved("tgi_request_failure", err="validation") == 1
    assert moved("tgi_request_duration", "_count") == 1
    assert moved("tgi_request_generated_tokens", "_count") == 1
    assert moved("tgi_request_generated_tokens", "_sum") == 5
    assert moved("kiln_generation_tokens") == 5
    assert moved("kiln_time_to_first_token_seconds", "_count") == 1
    # The histogram's +Inf bucket counts every observation.
    (inf,) = [
        s.value
        for s in after["tgi_request_duration"][1]
        if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"
    ]
    assert inf == _sum(after, "tgi_request_duration", "_count")


def test_label_values_are_escaped(http: httpx.Client) -> None:
    families = _scrape(http)
    statuses = {
        s.labels["status"]: s.value
        for s in families["kiln_model_status"][1]
        if s.labels["model"] == MODEL_NAME
    }
    assert statuses["available"] == 1 and sum(statuses.values()) == 1


def test_openmetrics_when_the_scraper_asks(http: httpx.Client) -> None:
    response = http.get("/metrics", headers={"Accept": OPENMETRICS})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(response.text)}
    assert {name: f.type for name, f in families.items()} == FAMILIES
    # OpenMetrics names a counter's sample `_total`, as its specification requires.
    assert any(s.name == "tgi_request_count_total" for s in families["tgi_request_count"].samples)


def test_each_server_counts_its_own_requests() -> None:
    """Two servers' metrics in one process (a registry each) neither clash nor mix."""
    first, second = RequestMetrics(), RequestMetrics()
    first.record_start()
    first.record_start()
    second.record_failure("validation")
    assert _counts(first) == {"tgi_request_count": 2, "tgi_request_failure": 0}
    assert _counts(second) == {"tgi_request_count": 0, "tgi_request_failure": 1}


def _counts(metrics: RequestMetrics) -> dict[str, float]:
    """Requests counted and failed in one registry, read back from its text exposition."""
    text = generate_latest(metrics.registry).decode()
    return {
        f.name: sum(s.value for s in f.samples)
        for f in text_string_to_metric_families(text)
        if f.type == "counter" and f.name != "tgi_request_success"
    }


# A second process writing kiln's request metrics into the shared directory, as a tensor-parallel
# worker or a second replica would.
OTHER_PROCESS = textwrap.dedent(
    """
    from kiln.serving.metrics import RequestMetrics, multiprocess_mode

    assert multiprocess_mode()
    metrics = RequestMetrics()
    for _ in range(3):
        metrics.record_start()
    metrics.record_failure("overloaded")
    """
)


def test_multiprocess_mode_sums_every_process(
    stories_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    with kiln_serve(stories_dir, tmp_path) as server, httpx.Client(timeout=TIMEOUT_S) as client:
        body = {"inputs": "Once", "parameters": {"max_new_tokens": 3}}
        assert client.post(server.url + "/generate", json=body).status_code == 200
        served = {
            f.name: f
            for f in text_string_to_metric_families(client.get(server.url + "/metrics").text)
        }
        assert _only(served["tgi_request_count"]) == 1
        subprocess.run(
            [sys.executable, "-c", OTHER_PROCESS], check=True, env=os.environ.copy(), timeout=60
        )
        families = {
            f.name: f
            for f in text_string_to_metric_families(client.get(server.url + "/metrics").text)
        }
    assert any(shared.glob("*.db")), "nothing was written to the shared directory"
    assert _only(families["tgi_request_count"]) == 1 + 3
    assert _only(families["tgi_request_success"]) == 1
    failures = {s.labels["err"]: s.value for s in families["tgi_request_failure"].samples}
    assert failures == {"overloaded": 1}
    # The engine's live metrics still come from the process that answers.
    assert _only(families["kiln_generation_tokens"]) == 3
    assert {name for name in FAMILIES} <= families.keys()


def _only(family: object) -> float:
    (sample,) = family.samples  # type: ignore[attr-defined]
    return sample.value
