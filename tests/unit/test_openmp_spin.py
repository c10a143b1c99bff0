"""``import kiln`` shortens libgomp's spin before torch loads it (see kiln/__init__.py), leaves a
user's own setting alone, and starts benchmark peers without what it set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_REPORT = (
    "import json, os, kiln; "
    "print(json.dumps([os.environ.get(n) for n in {names}] + [kiln.SETS_OPENMP_SPIN]))"
)


def _imported(first: str, environment: dict[str, str]) -> list[object]:
    """[OMP_WAIT_POLICY, GOMP_SPINCOUNT, kiln.SETS_OPENMP_SPIN] in a fresh interpreter that
    imports ``first`` (a module, or nothing) before kiln."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (f"import {first}; " if first else "") + _REPORT.format(
        names=["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"]
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_import_kiln_sets_a_short_spin() -> None:
    assert _imported("", {}) == [None, "3000", True]


@pytest.mark.parametrize(
    "environment",
    [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "100"}],
)
def test_a_users_setting_wins(environment: dict[str, str]) -> None:
    policy, spin, sets = _imported("", environment)
    assert (policy, spin) == (environment.get("OMP_WAIT_POLICY"), environment.get("GOMP_SPINCOUNT"))
    assert sets is False


def test_too_late_after_torch() -> None:
    assert _imported("torch", {}) == [None, None, False]


def test_peer_servers_start_without_kilns_setting() -> None:
    code = (
        "import kiln, os; from kiln.bench.llama_server import peer_environment; "
        "print(os.environ['GOMP_SPINCOUNT'], 'GOMP_SPINCOUNT' in peer_environment())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["3000", "False"]
