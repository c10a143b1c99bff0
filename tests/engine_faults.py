"""Faults injected into a real, served engine."""

from __future__ import annotations

from typing import Any

import pytest

from kiln import LLM


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
