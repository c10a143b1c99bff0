"""model_type (from config.json) -> the kiln class that implements it."""

from __future__ import annotations

from kiln.models.base import CausalLM
from kiln.models.gptj import GPTJForCausalLM
from kiln.models.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama with a sliding window / q,k,v bias: ModelConfig carries the
# difference, so one implementation serves all three.
MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gptj": GPTJForCausalLM,
}
