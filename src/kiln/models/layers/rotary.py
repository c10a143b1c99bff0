"""Rotary position embeddings: one cos/sin table per model, looked up once per step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` in float32, with Hugging Face's scaling rules."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    )
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position up to ``max_positions``.

    ``interleaved=False`` is the GPT-NeoX/Llama layout (rotate the two halves of the rotary
    dims); ``interleaved=True`` is GPT-J's (rotate adjacent pairs). Only the first
    ``rotary_dim`` dims of each head rotate; the rest pass through (GPT-J's partial rotary).
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        inv_freq = rope_inv_freq(rotary_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, rotary_dim // 2] each; non-persistent so they never hit a checkpoint.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.fits_cpu_kernels = not interleaved and rotary_dim == head_dim
        """kiln's fused rotary + cache-write kernel handles this layout (Llama's halves, every
        dim rotated)."""

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's tables at the full rotary width, ``[T, 1, rotary_dim]`` each; the sine
        carries the rotation's sign so :meth:`rotate_` needs no negation. Built once per step,
        shared by every layer."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is past the rotary table ({self.cos.shape[0]})"
            )
        cos, sin = self.cos[positions], self.sin[positions]  # [T, rotary_dim // 2]
        if self.interleaved:  # pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
            cos = cos.repeat_interleave(2, dim=-1)
            sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:  # halves (a, b) -> (a c - b s, b c + a s)
            cos = torch.cat((cos, cos), dim=-1)
            sin = torch.cat((-sin, sin), dim=-1)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def rotate_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate ``x`` ``[T, heads, head_dim]`` in place (a view into the fused q/k/v output,
        so the rotated keys sit next to the values for one cache write) with tables from
        :meth:`cos_sin`."""
        rot = x if self.rotary_dim == self.head_dim else x[..., : self.rotary_dim]
        # Both operands are computed before ``out`` is written, so aliasing ``rot`` is safe.
        torch.addcmul(rot * cos, self._swap(rot), sin, out=rot)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:meth:`rotate_` out of place: a new tensor, so autograd can differentiate through
        it (training); ``x`` is left as it is."""
        if self.rotary_dim == self.head_dim:
            return torch.addcmul(x * cos, self._swap(x), sin)  # as rotate_ computes it
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((torch.addcmul(rot * cos, self._swap(rot), sin), rest), dim=-1)

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        """The partner of each rotated dim: adjacent pairs swapped (GPT-J) or halves swapped."""
        if self.interleaved:
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x.roll(self.rotary_dim // 2, dims=-1)
