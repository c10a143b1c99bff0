"""An embedding looked up in the quantized LM head tied to it."""

from __future__ import annotations

import torch
from torch import nn

from kiln.models.layers.linear import Linear


class HeadRowsEmbedding(nn.Module):
    """A tied model's embedding read from its quantized LM head: a token's vector is its row of
    the head's weight, dequantized when looked up, so the float matrix (SmolLM2-135M: 108 MiB
    of a 201 MiB artifact, for 28.7 MiB of 8-bit head) is neither kept in memory nor stored.
    Used only where the head's rows dequantize to exactly the embedding's values (a GGUF's Q8_0
    embedding under an 8-bit head), so results are bit-identical to the float lookup."""

    def __init__(self, head: Linear) -> None:
        super().__init__()
        # NOTE: not a submodule: the head's blocks belong to lm_head, and would otherwise be
        # in the state dict (and an artifact) twice.
        self._head = (head,)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        rows = self._head[0].dequantize_rows(input_ids.reshape(-1).long())
        return rows.view(*input_ids.shape, -1)
