"""Group-wise weight quantization: the format kiln keeps quantized weights in, and how a
checkpoint's floats or GGUF blocks become it."""

from kiln.quantization.groups import GROUP_SIZE, GroupQuantized, quantize

__all__ = ["GROUP_SIZE", "GroupQuantized", "quantize"]
