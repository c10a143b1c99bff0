"""GGUF quantized blocks read straight into kiln's group-quantized form, without floats between.

Q4_0, Q4_1 and Q4_K become 4-bit groups and Q8_0 8-bit groups, exactly (the block scales are
float16 in the file and float32 here). Other types have no lossless match and are returned as
None: the caller dequantizes them and the layer requantizes from float.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from kiln.quantization import GROUP_SIZE, GroupQuantized

# Bits each GGML type keeps when loaded lossless; the others load as floats.
LOSSLESS_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q8_0: 8}
_HALF = GROUP_SIZE // 2


def _f16(column: np.ndarray) -> np.ndarray:
    return column.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 16-byte nibble layout -> 32 codes per group: low nibbles first, then high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def group_quantized(blocks: np.ndarray, qtype: Q) -> GroupQuantized | None:
    """``blocks``: one tensor's raw bytes as ``[rows, bytes_per_row]`` uint8."""
    rows = blocks.shape[0]
    if qtype == Q.Q8_0:  # 34 bytes: d, 32 x int8
        b = blocks.reshape(rows, -1, 34)
        codes = b[..., 2:].copy().view(np.int8).reshape(rows, -1)
        return GroupQuantized.from_numpy(8, codes, _f16(b[..., 0:2]), None, qtype.name)
    if qtype == Q.Q4_0:  # 18 bytes: d, 16 bytes of nibbles; w = d * (q - 8)
        b = blocks.reshape(rows, -1, 18)
        scales = _f16(b[..., 0:2])
        codes = _nibbles(b[..., 2:]).reshape(rows, -1)
        return GroupQuantized.from_numpy(4, codes, scales, -8 * scales, qtype.name)
    if qtype == Q.Q4_1:  # 20 bytes: d, m, 16 bytes of nibbles; w = d * q + m
        b = blocks.reshape(rows, -1, 20)
        codes = _nibbles(b[..., 4:]).reshape(rows, -1)
        return GroupQuantized.from_numpy(4, codes, _f16(b[..., 0:2]), _f16(b[..., 2:4]), qtype.name)
    if qtype == Q.Q4_K:
        return _q4_k(blocks.reshape(rows, -1, 144), qtype)
    return None


def _q4_k(b: np.ndarray, qtype: Q) -> GroupQuantized:
    """144-byte super-blocks of 256: d, dmin, 12 bytes of 6-bit sub-scales and sub-mins for
    8 groups of 32, then 128 bytes of nibbles (each 32 bytes: group 2i low, group 2i+1 high).
    Group ``s`` is ``w = d * sc[s] * q - dmin * m[s]``."""
    rows, blocks = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    packed = b[..., 4:16].reshape(rows, blocks, 3, 4)
    low, high, extra = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate([low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)], axis=-1)
    scales = d[..., None] * sc.astype(np.float32)  # [rows, blocks, 8]
    offsets = -dmin[..., None] * mins.astype(np.float32)
    qs = b[..., 16:].reshape(rows, blocks, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [rows, blocks, 4, 2, 32]
    return GroupQuantized.from_numpy(
        4,
        codes.reshape(rows, -1),
        scales.reshape(rows, -1),
        offsets.reshape(rows, -1),
        qtype.name,
    )
