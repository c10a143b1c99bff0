"""Linear layers whose parameters are allocated, not initialised: weights come from a checkpoint."""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.native import CPUKernels
from kiln.quantization import GROUP_SIZE, GroupQuantized, quantize

# Row counts the packed kernel is called with. NOTE: oneDNN keeps per-shape state for every
# distinct row count it sees and never frees it (measured: calls with 1..400 rows on four
# 3072x576 matrices grew RSS by ~1 GB). Padding rows up to these sizes (exact up to 8, then
# four per power of two, <= 25% padding) and splitting larger inputs into chunks of the
# largest size bounds that state to a few dozen shapes. A bucket's state is made on its first
# use (~0.6 ms per weight shape), not when a model loads: making them all means running every
# bucket's rows, ~1,650 tokens' worth of compute through the model (and up to 256 rows through
# the LM head): 0.64 s of the 0.94 s a float32 SmolLM2-135M artifact took to load, minutes for
# a 7B model on a CPU. CausalLM.warm_up makes them up front, for flat memory from the start.
_ROW_BUCKETS = (
    *range(1, 9),
    *(base * k // 4 for base in (8, 16, 32, 64, 128) for k in (5, 6, 7, 8)),
)
_MAX_PACKED_ROWS = _ROW_BUCKETS[-1]
_PACKING_BATCH_HINT = 16
# From this many rows (prefill), a quantized layer dequantizes its weight and runs a float
# matmul: the integer kernel is built for decode's few rows, and float GEMM wins on many
# (SmolLM2's 120 body matrices, 2 cores: kernel 54 ms vs dequantize + matmul 95 ms at 16 rows,
# 112 vs 109 at 32, 232 vs 146 at 64). Both give the same values up to float rounding.
_DEQUANTIZE_FROM_ROWS = 32


def _row_bucket(num_rows: int) -> int:
    return _ROW_BUCKETS[bisect.bisect_left(_ROW_BUCKETS, num_rows)]


def cpu_packing_available(dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear (the kernels torch.compile's CPU backend uses) is present and
    this CPU runs it in ``dtype``.

    NOTE: its bfloat16 and float16 paths need AVX-512 (or AVX-NE-CONVERT); on a CPU with
    AVX2 only, packing a bfloat16 weight raises, so such weights stay plain ``F.linear``.
    """
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


class Linear(nn.Module):
    """``y = x @ W.T + b`` with uninitialised storage.

    ``output_sizes`` names the row blocks of a fused projection (q/k/v, gate/up): the checkpoint
    stores them as separate tensors and the loader copies each into its rows, so one matmul
    replaces several (fewer kernel launches per token on the decode hot path).

    After :meth:`quantize_to` (before loading), the layer keeps its weight group-quantized
    (:mod:`kiln.quantization`): while loading as codes, scales and offsets (``qcodes``,
    ``qscales``, ``qoffsets``), then packed into the buffer ``qblocks`` that kiln's native CPU
    kernels (:mod:`kiln.kernels.native`) multiply with.
    """

    def __init__(self, in_features: int, output_sizes: list[int] | int, bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out_features = sum(self.output_sizes)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed_weight: torch.Tensor | None = None
        self.bits: int | None = None
        self._kernels: CPUKernels | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Linear:
        """A bias-free layer over ``weight``'s storage (an LM head tied to the embedding, given
        its own layer so it can be packed: packing makes its own copy)."""
        layer = cls(weight.shape[1], weight.shape[0])
        layer.weight.data = weight.detach()
        return layer

    def quantize_to(self, bits: int, kernels: CPUKernels) -> None:
        """Hold the weight group-quantized to ``bits`` (4 or 8) from now on; call before
        loading. The float storage is dropped (it was allocated, never written)."""
        out_features, in_features = self.weight_shape()
        if in_features % GROUP_SIZE:
            raise ValueError(f"in_features {in_features} is not a multiple of {GROUP_SIZE}")
        groups = in_features // GROUP_SIZE
        del self.weight
        self.weight = None
        code_dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qcodes", torch.empty(out_features, in_features, dtype=code_dtype))
        self.register_buffer("qscales", torch.empty(out_features, groups, dtype=torch.float32))
        self.register_buffer(
            "qoffsets",
            torch.empty(out_features, groups, dtype=torch.float32) if bits == 4 else None,
        )
        self.register_buffer("qblocks", None)
        self.bits = bits
        self._kernels = kernels

    def load_weight_rows(self, tensor: torch.Tensor | GroupQuantized, rows: slice) -> None:
        """Copy a checkpoint tensor (float, or group-quantized from GGUF) into ``rows`` of the
        weight, quantizing or dequantizing it to this layer's form."""
        if self.bits is None:
            if isinstance(tensor, GroupQuantized):
                tensor = tensor.dequantize()
            self.weight.data[rows].copy_(tensor)
            return
        if not isinstance(tensor, GroupQuantized) or tensor.bits != self.bits:
            dense = tensor.dequantize() if isinstance(tensor, GroupQuantized) else tensor
            tensor = quantize(dense, self.bits)
        self.qcodes[rows].copy_(tensor.codes)
        self.qscales[rows].copy_(tensor.scales)
        if self.qoffsets is not None:
            self.qoffsets[rows].copy_(tensor.offsets)

    def weight_shape(self) -> tuple[int, int]:
        """``[out, in]`` of the (logical) weight, whatever form it is stored in."""
        return self.out_features, self.in_features

    def dense_weight(self) -> torch.Tensor:
        """The weight as float32 ``[out, in]`` (dequantized if quantized; not while packed for
        oneDNN, whose layout is opaque)."""
        if self.bits is None:
            return self.weight.float()
        if self.qblocks is None:
            raise RuntimeError("dense_weight() before finish_loading()")
        return self._kernels.dequantize(self.bits, self.qblocks)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64 indices) of the quantized weight as float32 ``[len(rows), in]``:
        only those rows' blocks are read (an embedding looked up in a head it is tied to)."""
        if self.qblocks is None or self._kernels is None:
            raise RuntimeError("dequantize_rows() on a layer that is not quantized and loaded")
        return self._kernels.dequantize(self.bits, self.qblocks.index_select(0, rows))

    def finish_loading(self) -> None:
        """Pack codes and float16 scales into the kernels' blocks (``cpu_kernels.c``): per
        group of 32, int4 ``{d, m, 16 bytes of codes}`` (byte j: code j low, code j + 16
        high), int8 ``{d, 32 codes}``; the unpacked loading buffers are dropped."""
        if self.bits is None or self.qblocks is not None:
            return
        out_features, in_features = self.weight_shape()
        groups = in_features // GROUP_SIZE
        halves = [self.qscales] if self.bits == 8 else [self.qscales, self.qoffsets]
        fields = [t.half().view(torch.uint8).view(out_features, groups, 2) for t in halves]
        codes = self.qcodes.view(torch.uint8).view(out_features, groups, GROUP_SIZE)
        if self.bits == 4:
            codes = codes[..., : GROUP_SIZE // 2] | (codes[..., GROUP_SIZE // 2 :] << 4)
        self.qblocks = torch.cat([*fields, codes], dim=-1).flatten(1).contiguous()
        self.qcodes = self.qscales = self.qoffsets = None

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float().contiguous()
        if x.shape[0] >= _DEQUANTIZE_FROM_ROWS:
            out = F.linear(x32, self._kernels.dequantize(self.bits, self.qblocks))
        else:
            out = self._kernels.linear(self.bits, x32, self.qblocks)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.bits is not None:
            return self._quantized_forward(x)
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        num_rows = x.shape[0]
        if num_rows > _MAX_PACKED_ROWS:
            return torch.cat([self.forward(part) for part in x.split(_MAX_PACKED_ROWS)])
        bucket = _row_bucket(num_rows)
        if bucket != num_rows:
            x = F.pad(x, (0, 0, 0, bucket - num_rows))
        # NOTE: no fused residual add (the `binary` variant of this op): its per-shape state
        # for the row buckets took another ~500 MB RSS (SmolLM2) to save ~0.1 ms a token.
        out = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return out if bucket == num_rows else out[:num_rows]

    def pack_for_cpu(self) -> None:
        """Reorder the weight into oneDNN's blocked layout for small-batch matmuls.

        NOTE: decode on CPU is bound by streaming weights; the blocked layout streams them
        faster than ``F.linear`` does from a column-major or the row-major matrix (the 210
        layer matrices of SmolLM2-135M at 1 row, 2 cores, best of 7, two runs: 27 ms packed,
        32-37 ms column-major, 41-43 ms row-major). The original storage is released: a
        packed layer is for inference only.

        NOTE: the layout is chosen for a 16-row batch. A 1-row hint gives a layout that is
        no faster at 1 row and much slower at more (one SmolLM2 layer's four matmuls at 8
        rows: 1,409 us vs 850 us; at 64 rows: 3,898 us vs 3,052 us; hints of 16, 64 or none
        are within noise of each other at 1, 8 and 256 rows; 2 cores).
        """
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            self.weight.detach(), batch_size=_PACKING_BATCH_HINT
        )
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def warm_up(self, max_rows: int) -> None:
        """Run the packed kernel once at every row bucket up to the one ``max_rows`` rows fall
        in, so that oneDNN's per-shape state (~0.6 ms to make) is made now rather than while
        serving."""
        last = _row_bucket(min(max_rows, _MAX_PACKED_ROWS))
        with torch.inference_mode():
            for rows in _ROW_BUCKETS[: _ROW_BUCKETS.index(last) + 1]:
                x = torch.zeros(rows, self.packed_weight.shape[1], dtype=self.packed_weight.dtype)
                self.forward(x)

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])
