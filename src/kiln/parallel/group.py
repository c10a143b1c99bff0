"""One tensor-parallel rank's view of its process group: the few collectives the sharded layers
and the rank's runner need, held by the layers themselves (no global group is read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    """The default ``torch.distributed`` process group, seen from ``rank`` of ``world_size``.

    ``dist.init_process_group`` must have run in this process before any collective is called.
    """

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x`` (in place when ``x`` is contiguous)."""
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:  # [..., n] -> [..., n * world]
        """Every rank's ``x`` concatenated along the last dim, in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)

    def broadcast_ints(self, values: list[int], device: torch.device) -> list[int]:
        """Rank 0's ``values`` on every rank (the others pass a list of the same length)."""
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()


def split(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, length)`` of ``rank``'s part when ``size`` rows are split over ``world_size``
    ranks as evenly as possible (the first ``size % world_size`` ranks take one more)."""
    base, extra = divmod(size, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)
