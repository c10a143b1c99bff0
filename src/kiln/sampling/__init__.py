"""Per-request sampling parameters and the batched sampler (imports only config and errors)."""

from kiln.sampling.params import MAX_TOP_LOGPROBS, SamplingParams
from kiln.sampling.penalties import PenaltyState
from kiln.sampling.sampler import Sampler, SamplerOutput, SamplingRow, make_generator

__all__ = [
    "MAX_TOP_LOGPROBS",
    "PenaltyState",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingRow",
    "make_generator",
]
