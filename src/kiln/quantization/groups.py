"""Weights quantized in groups of 32 input features, one scale (and for 4 bits one offset) each.

int4: ``w = scale * code + offset`` with codes 0..15: GGUF's Q4_0, Q4_1 and Q4_K blocks are all
this form (Q4_K's 6-bit sub-block scales and mins multiply out to one scale and offset per 32
weights), so they load without loss. Floats are quantized to it by each group's min and max.

int8: ``w = scale * code`` with codes -127..127: GGUF's Q8_0 exactly; floats by each group's
largest magnitude (scale = max|w| / 127, as llama.cpp quantizes Q8_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP_SIZE = 32
BITS = (4, 8)


@dataclass(frozen=True)
class GroupQuantized:
    """One weight matrix ``[rows, cols]``, its codes unpacked (one per byte)."""

    bits: int
    codes: torch.Tensor
    """``[rows, cols]``: uint8 0..15 for 4 bits, int8 -127..127 for 8 bits."""
    scales: torch.Tensor
    """``[rows, cols / 32]`` float32."""
    offsets: torch.Tensor | None
    """``[rows, cols / 32]`` float32 for 4 bits; None for 8 bits."""
    source: str = ""
    """Where the codes came from (a GGUF type name, or "float"): for messages."""

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.codes.shape
        return rows, cols

    def dequantize(self) -> torch.Tensor:
        """float32 ``[rows, cols]``."""
        values = self.codes.float().unflatten(1, (-1, GROUP_SIZE))
        values = values * self.scales[..., None]
        if self.offsets is not None:
            values = values + self.offsets[..., None]
        return values.flatten(1)

    @classmethod
    def from_numpy(
        cls,
        bits: int,
        codes: np.ndarray,
        scales: np.ndarray,
        offsets: np.ndarray | None,
        source: str,
    ) -> GroupQuantized:
        return cls(
            bits=bits,
            codes=torch.from_numpy(np.ascontiguousarray(codes)),
            scales=torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
            offsets=(
                None
                if offsets is None
                else torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.float32))
            ),
            source=source,
        )


def quantize(weight: torch.Tensor, bits: int) -> GroupQuantized:
    """Quantize a float ``[rows, cols]`` matrix (``cols`` a multiple of 32) group-wise."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    rows, cols = weight.shape
    if cols % GROUP_SIZE:
        raise ValueError(f"{cols} input features is not a multiple of the group size {GROUP_SIZE}")
    groups = weight.detach().float().reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    # Scales and offsets are rounded to float16 (how the kernels store them) before the codes
    # are chosen, so each code is the nearest level of the grid actually used.
    if bits == 8:
        scales = _half(groups.abs().amax(-1) / 127)
        inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
        codes = torch.round(groups * inverse[..., None]).clamp_(-127, 127).to(torch.int8)
        return GroupQuantized(8, codes.reshape(rows, cols), scales, None, "float")
    low = _half(groups.amin(-1))
    scales = _half((groups.amax(-1) - low) / 15)
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    codes = torch.round((groups - low[..., None]) * inverse[..., None]).clamp_(0, 15)
    return GroupQuantized(4, codes.to(torch.uint8).reshape(rows, cols), scales, low, "float")


def _half(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to float16, as float32 (rounded up in magnitude where rounding to
    nearest would shrink a scale, so the largest weight of a group still fits in its codes)."""
    rounded = values.half().float()
    too_small = rounded.abs() < values.abs()
    return torch.where(
        too_small, torch.nextafter(values.half(), values.half() * 2).float(), rounded
    )
