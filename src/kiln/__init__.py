"""kiln: from an open LLM checkpoint to a fast, reliable chatbot."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# NOTE: set before torch is imported, because libgomp reads it once, when it loads. By default
# each of torch's OpenMP threads keeps spinning on its core for a while after every parallel op
# (measured as CPU time used while the main thread slept after an op: ~1.5 ms on a Xeon with
# AMX, 0.1 ms with GOMP_SPINCOUNT=3000); kiln's CPU kernels run on their own threads
# (kiln/kernels/cpu_kernels.c), which then share that core with a spinner: a prefill step of a
# few tokens, where torch ops and kiln's linear layers alternate, took 41-124 ms instead of the
# 24 ms it takes with those threads asleep (OMP_WAIT_POLICY=PASSIVE) or with 3,000 polls. Not
# PASSIVE: llama.cpp (a benchmark peer, sharing the process's libgomp in process) meets at an
# OpenMP barrier after every op, and decoded 27 tokens/s instead of 97 with it. A user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; importing torch before kiln leaves libgomp's default
# (kiln.kernels.native then logs a warning once).


def openmp_spin_is_set() -> bool:
    """Whether the environment already says how libgomp's threads wait."""
    return any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))


SETS_OPENMP_SPIN = "torch" not in sys.modules and not openmp_spin_is_set()
"""Whether this import set GOMP_SPINCOUNT (so a peer process can be started without it)."""
if SETS_OPENMP_SPIN:
    os.environ["GOMP_SPINCOUNT"] = "3000"

if TYPE_CHECKING:
    from kiln.config.engine_args import EngineArgs
    from kiln.engine.outputs import CompletionOutput, RequestOutput
    from kiln.llm import LLM
    from kiln.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]

# NOTE: imported on first use: `from kiln import LLM` loads torch (~1 s), which the torch-free
# parts (`kiln plan`, `kiln bench serve`, kiln.loadtest) must not pay for.
_LAZY = {
    "EngineArgs": "kiln.config.engine_args",
    "CompletionOutput": "kiln.engine.outputs",
    "RequestOutput": "kiln.engine.outputs",
    "LLM": "kiln.llm",
    "SamplingParams": "kiln.sampling",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
