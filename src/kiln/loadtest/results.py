"""The JSON results of a run.

Top-level figures use ``vllm bench serve``'s field names where the metric is the same
(``completed``, ``total_input_tokens``, ``request_throughput``, ``output_throughput``,
``total_token_throughput``, ``request_goodput``, ``mean_ttft_ms``, ``median_tpot_ms``,
``p99_itl_ms``, ``mean_e2el_ms``, ``ttfts``, ``itls``, ``input_lens``, ``output_lens``,
``errors``...); kiln's additions say what they are (``requests_per_minute``,
``total_tokens_per_minute`` = input + output, ``cost_per_1m_output_tokens``...). A sweep's
top level is its step with the highest output throughput; every step is under ``levels``.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.loadtest.metrics import RequestRecord, throughput_over_time
from kiln.loadtest.runner import Level

FORMAT = "kiln-bench-serve/1"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write null for them."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _request(record: RequestRecord) -> dict[str, Any]:
    return {
        "step": record.step,
        "phase": record.phase,
        "turn": record.turn,
        "start": record.start,
        "ttft": record.ttft,
        "e2e": record.e2e,
        "tpot": record.tpot,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "num_events": len(record.event_times),
        "error": record.error,
        "error_detail": record.error_detail,
    }


def level_label(level: Level) -> str:
    return level.shape.describe()


def build_results(
    config: dict[str, Any],
    levels: Sequence[Level],
    notes: Sequence[str],
    stop_reason: str | None,
) -> dict[str, Any]:
    """The results document: the run's settings, the (best) level's figures at the top, every
    level under ``levels``, and each request under ``requests``."""
    best = max(levels, key=lambda lv: lv.summary["output_throughput"])
    records = [r for lv in levels for r in lv.records]
    measured = [r for r in best.records if r.phase == "measure"]
    done = [r for r in measured if r.ok]
    doc: dict[str, Any] = {
        "format": FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **config,
        "load": level_label(best),
        "max_concurrency": best.shape.users,
        "request_rate": best.shape.rate if best.shape.rate is not None else "inf",
        "burstiness": 1.0 if best.shape.arrivals == "poisson" else None,
        **best.summary,
        "input_lens": [r.input_tokens for r in done],
        "output_lens": [r.output_tokens for r in done],
        "ttfts": [r.ttft for r in done],
        "itls": [r.itls for r in done],
        "e2els": [r.e2e for r in done],
        "errors": [f"{r.error}: {r.error_detail}" for r in measured if not r.ok],
        "num_warmup_requests": sum(1 for r in records if r.phase == "warmup"),
        "stopped_early": best.stopped_early,
        "sweep": len(levels) > 1,
        "sweep_stop_reason": stop_reason,
        "notes": list(notes),
        "levels": [
            {
                "step": lv.step,
                "load": level_label(lv),
                "shape": lv.shape.as_dict(),
                "summary": lv.summary,
                "stopped_early": lv.stopped_early,
                "throughput_over_time": throughput_over_time(lv.records),
            }
            for lv in levels
        ],
        "requests": [_request(r) for r in records],
    }
    return _clean(doc)


def write_results(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "completed" not in doc:
        raise ValueError(f"{path}: not a results file of kiln bench serve")
    return doc
