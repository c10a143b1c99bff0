"""kiln: from an open LLM checkpoint to a fast, reliable chatbot."""

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
