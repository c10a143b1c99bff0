"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.native import CPUKernels


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 like the reference implementation."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps
        self.kernels: CPUKernels | None = None
        """kiln's CPU kernels, set by :meth:`CausalLM.prepare_for_cpu` for float32 models."""

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` and its norm: (normed, new residual). With kiln's CPU kernels both
        happen in one pass, in place (``x`` becomes the normed rows, ``residual`` the sum):
        at one token, PyTorch's add and fused rms_norm cost ~20x their arithmetic."""
        if self.kernels is not None and x.is_contiguous() and residual.is_contiguous():
            self.kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        residual = residual + x
        return self.forward(residual), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # NOTE: the fused kernel is several times cheaper than the 5-op python version.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias and uninitialised storage (GPT-J)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
