"""kiln: from an open LLM checkpoint to a fast, reliable chatbot."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
