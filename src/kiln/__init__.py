"""kiln: from an open LLM checkpoint to a fast, reliable chatbot."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# NOTE: set before torch is imported, because libgomp reads it once, when it loads. By default
# each of torch's OpenMP threads keeps spinning on its core for a while after every parallel
# op; kiln's CPU kernels run on their own threads (kiln/kernels/cpu_kernels.c), which then
# share that core with a spinner: a prefill step of a few tokens, where torch ops and kiln's
# linear layers alternate, ran 1.7-5x slower (41-124 ms against 24 ms). PASSIVE sends torch's
# threads to sleep as soon as an op ends. Setting OMP_WAIT_POLICY yourself wins; importing
# torch before kiln leaves torch's default (kiln.kernels.native then logs a warning once).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
