"""Probes on a real, served engine: faults injected into its steps, and a record of what it
receives (the engine still runs everything)."""

from __future__ import annotations

from typing import Any

import pytest

from kiln import LLM, SamplingParams


def fail_steps_after(llm: LLM, monkeypatch: pytest.MonkeyPatch, num_ok: int) -> None:
    """Make the served engine's step fail after ``num_ok`` good ones (the engine loop survives
    a failed step: it fails the requests in flight and goes on)."""
    step = llm.engine.step
    calls = 0

    def failing_step() -> Any:
        nonlocal calls
        calls += 1
        if calls > num_ok:
            raise RuntimeError("boom")
        return step()

    monkeypatch.setattr(llm.engine, "step", failing_step)


def record_sampling_params(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    """A list that receives the SamplingParams of every request ``llm``'s engine is given."""
    seen: list[SamplingParams] = []
    add_request = llm.engine.add_request

    def spy(request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Any:
        seen.append(params)
        return add_request(request_id, prompt_token_ids, params)

    monkeypatch.setattr(llm.engine, "add_request", spy)
    return seen
