"""Compile ``cpu_kernels.c`` on first use, cache the shared library on disk, call it with ctypes.

Why not a PyTorch C++ extension: including torch's headers makes the first build take about a
minute on 2 cores; this plain C file builds in about a second with ``gcc``, and ctypes drops the
GIL during each call. The library runs on its own small pool of threads (see cpu_kernels.c for
why not OpenMP's); it uses OpenMP's ``simd`` pragmas only, which need no runtime.

The cached library's name hashes the source, the compiler command and the CPU's flags, so a
cache directory shared between machines never hands one CPU another's build. Where the kernels
cannot run (not x86-64 Linux with AVX2/FMA/F16C, no C compiler, a failed build),
:func:`cpu_kernels` returns None and callers keep weights in floating point.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import kiln

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_BPE_SOURCE = Path(__file__).with_name("bpe.c")
_REQUIRED_FLAGS = frozenset({"avx2", "fma", "f16c"})
_CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-std=c11")
GROUP_SIZE = 32
"""Weights and activations are quantized in groups of this many input features."""
BLOCK_BYTES = {4: 20, 8: 34}
"""Bytes per group of 32 weights: float16 scale (and offset) and the codes, see cpu_kernels.c."""


def cache_dir() -> Path:
    """``$KILN_CACHE_DIR`` or ``~/.cache/kiln``: compiled kernels live under ``kernels/``."""
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(root) / "kernels"


def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where bfloat16 compute beats
    float32; elsewhere PyTorch converts bfloat16 to float32 around every multiply."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


class LlamaLayer(ctypes.Structure):
    """One decoder layer's constant arguments to ``kiln_llama_decode`` (``kiln_llama_layer``
    in cpu_kernels.c): norm weights, each linear layer's bits and blocks, the layer's cache."""

    _fields_ = (
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("qkv_bits", ctypes.c_int),
        ("qkv", ctypes.c_void_p),
        ("qkv_bias", ctypes.c_void_p),
        ("o_bits", ctypes.c_int),
        ("o", ctypes.c_void_p),
        ("gate_up_bits", ctypes.c_int),
        ("gate_up", ctypes.c_void_p),
        ("down_bits", ctypes.c_int),
        ("down", ctypes.c_void_p),
        ("cache", ctypes.c_void_p),
    )


class CPUKernels:
    """ctypes bindings of the compiled library; tensors must be contiguous and on the CPU
    (float32 where a dtype is not said)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._linear = library.kiln_quantized_linear
        self._linear.restype = ctypes.c_int
        self._linear.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        self._add_rms_norm = library.kiln_add_rms_norm
        self._add_rms_norm.restype = None
        self._add_rms_norm.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_float,
        ]  # fmt: skip
        self._decode_attention = library.kiln_decode_attention
        self._decode_attention.restype = ctypes.c_int
        self._decode_attention.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        self._rope_and_cache = library.kiln_rope_and_cache
        self._rope_and_cache.restype = None
        self._rope_and_cache.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ]  # fmt: skip
        self._silu_mul = library.kiln_silu_mul
        self._silu_mul.restype = None
        self._silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.llama_decode = library.kiln_llama_decode
        """The C function itself (see cpu_kernels.c): its caller prepares the layers' constant
        arguments (a :class:`LlamaLayer` array) once, as its per-token cost is the point."""
        self.llama_decode.restype = ctypes.c_int
        self.llama_decode.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,  # hidden, residual
            ctypes.POINTER(LlamaLayer),
            ctypes.c_int64,
            ctypes.c_float,  # layers, how many, eps
            *[ctypes.c_int64] * 6,  # B, E, H, KV, D, I
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,  # cos, sin, new slots
            ctypes.c_int64,  # the caches' slots
            ctypes.c_void_p,
            ctypes.c_void_p,  # context slots, starts
            ctypes.c_float,
            ctypes.c_int64,
            ctypes.c_int,  # scale, window, threads
        ]
        self._populate = library.kiln_populate
        self._populate.restype = ctypes.c_int
        self._populate.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        self._dequantize = library.kiln_dequantize
        self._dequantize.restype = None
        self._dequantize.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int,
        ]  # fmt: skip

    def linear(
        self,
        bits: int,
        x: torch.Tensor,  # [M, K] float32, contiguous
        blocks: torch.Tensor,  # [N, K / 32 * BLOCK_BYTES[bits]] uint8 (see cpu_kernels.c)
        threads: int | None = None,  # default: torch.get_num_threads()
    ) -> torch.Tensor:  # [M, N] float32
        """``x @ W.T`` over the quantized weight (float activations)."""
        rows, in_features = x.shape
        out_features = blocks.shape[0]
        y = torch.empty(rows, out_features, dtype=torch.float32)
        status = self._linear(
            bits,
            x.data_ptr(),
            rows,
            in_features,
            blocks.data_ptr(),
            out_features,
            y.data_ptr(),
            threads or torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("kiln_quantized_linear could not allocate its scratch memory")
        return y

    def add_rms_norm(
        self,
        x: torch.Tensor,  # [T, dim] float32 contiguous: overwritten with the normalised rows
        residual: torch.Tensor | None,  # [T, dim] float32 contiguous: += x first, when given
        weight: torch.Tensor,  # [dim] float32
        eps: float,
    ) -> None:
        rows, dim = x.shape
        self._add_rms_norm(
            x.data_ptr(),
            residual.data_ptr() if residual is not None else None,
            weight.data_ptr(),
            rows,
            dim,
            eps,
        )

    def decode_attention(
        self,
        q: torch.Tensor,  # [B, H, D] float32 contiguous
        cache: torch.Tensor,  # [2, slots, KV, D] float32 contiguous
        slots: torch.Tensor,  # [sum of context lengths] int64: each sequence's slots in order
        starts: torch.Tensor,  # [B + 1] int64: sequence b owns slots[starts[b]:starts[b + 1]]
        scale: float,
        window: int,  # 0: no sliding window
    ) -> torch.Tensor:  # [B, H, D] float32
        batch, heads, head_dim = q.shape
        out = torch.empty_like(q)
        status = self._decode_attention(
            q.data_ptr(),
            cache.data_ptr(),
            cache.shape[1],
            slots.data_ptr(),
            starts.data_ptr(),
            batch,
            heads,
            cache.shape[2],
            head_dim,
            scale,
            window,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("kiln_decode_attention could not allocate its scratch memory")
        return out

    def rope_and_cache(
        self,
        qkv: torch.Tensor,  # [T, H + 2 KV, D] float32 contiguous: q and k heads rotated in place
        num_heads: int,
        cos: torch.Tensor,  # [T, 1, D] float32 contiguous (RotaryEmbedding.cos_sin's tables)
        sin: torch.Tensor,
        slots: torch.Tensor,  # [T] int64
        cache: torch.Tensor,  # [2, slots, KV, D] float32 contiguous
    ) -> None:
        tokens, _, head_dim = qkv.shape
        self._rope_and_cache(
            qkv.data_ptr(),
            tokens,
            num_heads,
            cache.shape[2],
            head_dim,
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            cache.data_ptr(),
            cache.shape[1],
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of ``[T, 2 I]`` float32 contiguous rows (gate first): ``[T, I]``."""
        tokens, width = gate_up.shape
        out = torch.empty(tokens, width // 2, dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), tokens, width // 2, out.data_ptr())
        return out

    def populate(self, address: int, length: int) -> None:
        """Read the ``length`` bytes of a file mapping at ``address`` into memory, map them and
        read a byte of each page (see ``kiln_populate``): blocking, without the GIL."""
        self._populate(address, length, mmap.PAGESIZE)

    def dequantize(self, bits: int, blocks: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` float32 weights of quantized ``blocks``."""
        out_features = blocks.shape[0]
        in_features = blocks.shape[1] // BLOCK_BYTES[bits] * GROUP_SIZE
        out = torch.empty(out_features, in_features, dtype=torch.float32)
        self._dequantize(
            bits,
            blocks.data_ptr(),
            out_features,
            in_features,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out


@functools.cache
def cpu_kernels() -> CPUKernels | None:
    """The compiled kernels, building them on first use; None where they cannot run here."""
    if os.environ.get("KILN_NATIVE_KERNELS", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpu_flags()
    if not flags >= _REQUIRED_FLAGS:
        logger.info(
            "CPU lacks %s: quantized weights run in floating point", _REQUIRED_FLAGS - flags
        )
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("no C compiler (gcc): quantized weights run in floating point")
        return None
    if not kiln.openmp_spin_is_set():
        logger.warning(
            "torch was imported before kiln, so its OpenMP threads spin long after each op and"
            " slow kiln's CPU kernels (prefill steps up to 5x); import kiln first, or set"
            " GOMP_SPINCOUNT=3000"
        )
    try:
        return CPUKernels(ctypes.CDLL(str(_build(_SOURCE, compiler, flags))))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", None) or "").strip()[-2000:]  # the compiler's own words
        logger.warning(
            "could not build kiln's CPU kernels (%s%s): weights run in floating point",
            e,
            f": {detail}" if detail else "",
        )
        return None


@functools.cache
def bpe_library() -> ctypes.CDLL | None:
    """``bpe.c`` built (kiln's compiled tokenizers merge with it); None where it cannot be
    (not Linux, no C compiler, a failed build): callers then use ``tokenizers`` alone."""
    if os.environ.get("KILN_NATIVE_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    try:
        return ctypes.CDLL(str(_build(_BPE_SOURCE, compiler, cpu_flags())))
    except (OSError, subprocess.CalledProcessError) as e:
        logger.warning("could not build kiln's BPE merging (%s): tokenizers parses instead", e)
        return None


def _build(path: Path, compiler: str, flags: frozenset[str]) -> Path:
    source = path.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                compiler.encode(),
                " ".join(_CFLAGS).encode(),
                *sorted(f.encode() for f in flags),
            ]
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"{path.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first starts never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *_CFLAGS, str(path), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(built, target)
    logger.info("built kiln's CPU kernels: %s", target)
    return target
