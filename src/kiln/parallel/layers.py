"""The layers a tensor-parallel rank swaps into a loaded model's module tree.

Column-parallel projections need no layer of their own (a plain :class:`Linear` holding the
rank's rows); the layers here add the one collective each parallel layout needs after its
local matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.layers.linear import Linear
from kiln.parallel.group import TensorParallelGroup


class RowParallelLinear(Linear):
    """``y = sum over ranks of x_r @ W_r.T (+ b)``: each rank holds the columns of ``W`` for its
    slice of the input features (its heads, its part of the MLP) and the partial products are
    all-reduced. Only rank 0 holds the real bias (the others hold zeros), so it is added once.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / N] -> [T, out]
        return self.group.all_reduce(super().forward(x))


class GatheredHead(Linear):
    """The LM head split over the vocabulary: each rank computes the logits of its slice of the
    vocabulary, and every rank gets the whole row (the sampler needs all of it)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    @classmethod
    def tied_to(cls, weight: torch.Tensor, group: TensorParallelGroup) -> GatheredHead:
        """A bias-free head over ``weight``'s storage (the rank's slice of a tied embedding)."""
        head = cls(weight.shape[1], weight.shape[0], bias=False, group=group)
        head.weight.data = weight.detach()
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, vocab]
        return self.group.all_gather_last(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows are split over the ranks: a rank looks up the ids in its slice,
    writes zeros for the others, and the all-reduce fills in every row from the rank that has
    it (exactly: each sum has one non-zero term)."""

    def __init__(
        self, start: int, num_embeddings: int, embedding_dim: int, group: TensorParallelGroup
    ) -> None:
        super().__init__()
        self.start, self.end = start, start + num_embeddings
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        elsewhere = (input_ids < self.start) | (input_ids >= self.end)
        local_ids = (input_ids - self.start).masked_fill_(elsewhere, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(elsewhere.unsqueeze(-1), 0)
        return self.group.all_reduce(out)
