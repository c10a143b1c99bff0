"""Linear layers whose parameters are allocated, not initialised: weights come from a checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cpu_packing_available() -> bool:
    """oneDNN's prepacked linear (the kernels torch.compile's CPU backend uses) is present."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


class Linear(nn.Module):
    """``y = x @ W.T + b`` with uninitialised storage.

    ``output_sizes`` names the row blocks of a fused projection (q/k/v, gate/up): the checkpoint
    stores them as separate tensors and the loader copies each into its rows, so one matmul
    replaces several (fewer kernel launches per token on the decode hot path).
    """

    def __init__(self, in_features: int, output_sizes: list[int] | int, bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed_weight: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Linear:
        """A bias-free layer holding a copy of ``weight`` (an untied LM head for packing)."""
        layer = cls(weight.shape[1], weight.shape[0])
        layer.weight.data = weight.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def pack_for_cpu(self) -> None:
        """Reorder the weight into oneDNN's blocked layout for small-batch matmuls.

        NOTE: decode on CPU is bound by streaming weights; the blocked layout streams them
        ~1.3x faster than ``F.linear`` on a column-major matrix and ~1.9x faster than on the
        row-major one (all SmolLM2-135M matrices at batch 1, 2 cores: 24 / 32 / 45 ms). The
        original storage is released: a packed layer is for inference only.
        """
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            self.weight.detach(), batch_size=1
        )
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])
