"""Linear layers whose parameters are allocated, not initialised: weights come from a checkpoint."""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

# Row counts the packed kernel is called with. NOTE: oneDNN keeps per-shape state for every
# distinct row count it sees and never frees it (measured: calls with 1..400 rows on four
# 3072x576 matrices grew RSS by ~1 GB). Padding rows up to these sizes (exact up to 8, then
# four per power of two, <= 25% padding) and splitting larger inputs into chunks of the
# largest size bounds that state to a few dozen shapes.
_ROW_BUCKETS = (
    *range(1, 9),
    *(base * k // 4 for base in (8, 16, 32, 64, 128) for k in (5, 6, 7, 8)),
)
_MAX_PACKED_ROWS = _ROW_BUCKETS[-1]


def _row_bucket(num_rows: int) -> int:
    return _ROW_BUCKETS[bisect.bisect_left(_ROW_BUCKETS, num_rows)]


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

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:  # [T, in] -> [T, out]
        """``x @ W.T + b``, plus ``residual`` ``[T, out]`` when given (fused into the packed
        kernel as a post-op: no separate add over the output)."""
        if self.packed_weight is None:
            out = F.linear(x, self.weight, self.bias)
            return out if residual is None else out.add_(residual)
        num_rows = x.shape[0]
        if num_rows > _MAX_PACKED_ROWS:
            parts = x.split(_MAX_PACKED_ROWS)
            residuals = (
                [None] * len(parts) if residual is None else residual.split(_MAX_PACKED_ROWS)
            )
            return torch.cat([self.forward(p, r) for p, r in zip(parts, residuals, strict=True)])
        bucket = _row_bucket(num_rows)
        if bucket != num_rows:
            x = F.pad(x, (0, 0, 0, bucket - num_rows))
            if residual is not None:
                residual = F.pad(residual, (0, 0, 0, bucket - num_rows))
        if residual is None:
            out = torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(
                x, residual, self.packed_weight, self.bias, "add"
            )
        return out if bucket == num_rows else out[:num_rows]

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

    def warm_up(self) -> None:
        """Run the packed kernel (plain and with the residual post-op) once at every row
        bucket, so that oneDNN's per-shape state is created now rather than growing memory
        while serving."""
        with torch.inference_mode():
            out_features, in_features = self.packed_weight.shape
            for rows in _ROW_BUCKETS:
                x = torch.zeros(rows, in_features, dtype=self.packed_weight.dtype)
                self.forward(x)
                self.forward(x, residual=torch.zeros(rows, out_features, dtype=x.dtype))

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])
