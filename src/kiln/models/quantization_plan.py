"""Which linear layers keep their weights quantized, and in how many bits.

``quantize`` is what the user asked for:

- ``None`` (the default): keep what the checkpoint stores. A GGUF's 4-bit layers (Q4_0, Q4_1,
  Q4_K) stay 4-bit, its other quantized layers (Q8_0, Q5_*, Q6_K, Q2_K, Q3_K) become 8-bit;
  float layers and float checkpoints stay float.
- ``"none"``: everything in floating point (GGUF tensors dequantized), as transformers loads it.
- ``"int8"``: every linear layer 8-bit.
- ``"int4"``: every linear layer 4-bit except the LM head, which is 8-bit: the head is the
  layer most sensitive to error, and llama.cpp's own 4-bit mixes keep it at 6 or 8 bits.

A fused projection (q/k/v, gate/up) is one layer: its shards must share a form, so it takes the
widest its checkpoint tensors need. Layers whose input size is not a multiple of the group size
(32) stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.config.engine_args import QUANTIZE_CHOICES
from kiln.models.base import CausalLM
from kiln.quantization import GROUP_SIZE
from kiln.weights.gguf_quantized import LOSSLESS_BITS

_FLOAT_FORMATS = frozenset({"F32", "F16", "BF16", "F64"})
_FOUR_BIT_FORMATS = frozenset(q.name for q, bits in LOSSLESS_BITS.items() if bits == 4)
_TIED_HEAD_SOURCE = "model.embed_tokens.weight"


@dataclass
class QuantizationPlan:
    layers: dict[str, int] = field(default_factory=dict)
    """Bits (4 or 8) for each linear layer that is quantized, by module name."""
    tied_head: int | None = None
    """Bits for a head tied to the embedding (None: it reads the float embedding)."""

    def __bool__(self) -> bool:
        return bool(self.layers) or self.tied_head is not None


def _bits_for_formats(formats: list[str | None]) -> int | None:
    stored = [f for f in formats if f is not None and f not in _FLOAT_FORMATS]
    if not stored:
        return None
    return 4 if all(f in _FOUR_BIT_FORMATS for f in stored) else 8


def plan_quantization(
    model: CausalLM, quantize: str | None, weight_formats: dict[str, str]
) -> QuantizationPlan:
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize == "none":
        return QuantizationPlan()
    plan = QuantizationPlan()
    for name, layer in model.linear_layers().items():
        _, in_features = layer.weight_shape()
        if in_features % GROUP_SIZE:
            continue
        if quantize is None:
            bits = _bits_for_formats([weight_formats.get(n) for n in model.checkpoint_names(name)])
        elif name == "lm_head":
            bits = 8
        else:
            bits = 4 if quantize == "int4" else 8
        if bits is not None:
            plan.layers[name] = bits
    if model.config.tie_word_embeddings and model.config.hidden_size % GROUP_SIZE == 0:
        if quantize is None:
            plan.tied_head = _bits_for_formats([weight_formats.get(_TIED_HEAD_SOURCE)])
        else:
            plan.tied_head = 8
    return plan


def quantizes(quantize: str | None, weight_formats: dict[str, str]) -> bool:
    """Whether ``quantize`` keeps any layer quantized for a checkpoint stored as
    ``weight_formats`` (before a model exists to plan for)."""
    if quantize in ("int8", "int4"):
        return True
    if quantize == "none":
        return False
    return _bits_for_formats(list(weight_formats.values())) is not None
