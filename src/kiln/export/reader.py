"""Load an exported artifact: check it was made for this kiln, torch and device, then put its
runtime-layout tensors straight into a freshly allocated model (no quantization, no packing of
quantized layers). An artifact exported with ``--tp N`` is loaded by N tensor-parallel ranks,
each reading only its own file into its shard (:meth:`Artifact.build_rank_model`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kiln
from kiln.config import ModelConfig
from kiln.config.engine_args import EngineArgs
from kiln.engine.kv_cache import kv_bytes_per_block
from kiln.errors import ConfigError, ModelLoadError
from kiln.export.manifest import ArtifactManifest, read_manifest
from kiln.kernels.native import BLOCK_BYTES, cpu_kernels
from kiln.models.base import CausalLM
from kiln.models.layers.linear import Linear
from kiln.models.loader import DTYPES, allocate_model, prepare_for_inference
from kiln.parallel.group import TensorParallelGroup
from kiln.parallel.shard import allocate_rank_model
from kiln.quantization import GROUP_SIZE
from kiln.text.compiled_tokenizer import COMPILED_TOKENIZER_FILE, CompiledTokenizer
from kiln.weights.checkpoint import Checkpoint, WeightIterator
from kiln.weights.hf import load_hf_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """An exported artifact on disk and its manifest."""

    path: Path
    manifest: ArtifactManifest
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.dtype]

    def engine_args(self, args: EngineArgs) -> EngineArgs:
        """``args`` fitted to the artifact: its device by default, its sequence length as the
        context, its batch size as the most sequences at once and its tensor-parallel degree;
        options that contradict what was exported are a :class:`ConfigError`.

        ``tp`` 1 (EngineArgs' default, so also "not given") adopts the artifact's degree: a
        pre-sharded artifact cannot run as one process anyway. Any other degree must be the
        artifact's (the ranks' files are fixed at export)."""
        m = self.manifest
        tp = m.tp_degree if args.tp == 1 else args.tp
        if tp != m.tp_degree:
            raise ConfigError(
                f"{self.path}: exported for tp={m.tp_degree}; tp={args.tp} would need another "
                f"export (kiln export --tp {args.tp}), or leave --tp out to run it at "
                f"tp={m.tp_degree}"
            )
        if args.dtype not in ("auto", *[k for k, v in DTYPES.items() if v == self.dtype]):
            raise ConfigError(
                f"{self.path}: exported with dtype {m.dtype}; --dtype {args.dtype} would need "
                "another export"
            )
        if args.quantize is not None and args.quantize != m.quantization:
            raise ConfigError(
                f"{self.path}: exported with quantization {m.quantization}; --quantize "
                f"{args.quantize} would need another export"
            )
        if args.max_model_len is not None and args.max_model_len > m.sequence_length:
            raise ConfigError(
                f"max_model_len {args.max_model_len} exceeds the exported sequence length "
                f"{m.sequence_length}"
            )
        return dataclasses.replace(
            args,
            device=args.device or m.device,
            max_model_len=args.max_model_len or m.sequence_length,
            max_num_seqs=min(args.max_num_seqs, m.batch_size),
            tp=tp,
        )

    def size_kv_cache(self, args: EngineArgs, config: ModelConfig) -> EngineArgs:
        """Unless ``args`` sets it, a KV cache of exactly the exported shapes (batch size
        sequences of sequence length tokens) instead of the default 1 GiB on a CPU: zeroing
        that was most of a warm start (SmolLM2: 1.5 s of 3.5 s)."""
        if args.kv_cache_memory is not None:
            return args
        m = self.manifest
        blocks = m.batch_size * -(-m.sequence_length // args.block_size)
        per_block = kv_bytes_per_block(config, args.block_size, self.dtype)
        return dataclasses.replace(args, kv_cache_memory=blocks * per_block)

    def check_runtime(self, device: torch.device, allow_recompile: bool) -> None:
        """Refuse an artifact made by another kiln or torch version, or for another device,
        unless ``allow_recompile`` (then warn: on a CPU nothing compiled is stored, so loading
        its tensors as they are is what a recompile amounts to)."""
        m = self.manifest
        problems = []
        if m.kiln_version != kiln.__version__:
            problems.append(f"kiln {m.kiln_version} (this is kiln {kiln.__version__})")
        if m.torch_version != torch.__version__:
            problems.append(f"torch {m.torch_version} (this is torch {torch.__version__})")
        if m.device != device.type:
            problems.append(f"device {m.device} (loading on {device.type})")
        if not problems:
            return
        what = f"{self.path}: exported for {', '.join(problems)}"
        if not allow_recompile:
            raise ModelLoadError(
                f"{what}; export it again here, or pass --allow-recompile to load it anyway"
            )
        if m.quantized_layers and device.type != "cpu":
            raise ModelLoadError(f"{what}; its quantized layers run on the CPU only")
        logger.warning("%s; loading it anyway (--allow-recompile)", what)

    def checkpoint(self, name: str) -> Checkpoint:
        """Config, tokenizer and chat template as a :class:`Checkpoint`; its weights are read
        by :meth:`build_model`, not through ``load_weights``. The tokenizer is the compiled one
        where the artifact has it and it loads here, else ``tokenizer.json`` parsed."""
        checkpoint = load_hf_dir(self.path, name, self._compiled_tokenizer())
        return dataclasses.replace(
            checkpoint,
            load_weights=self._refuse_plain_loading,
            load_quantized_weights=None,
            weight_formats={},
        )

    def _compiled_tokenizer(self) -> CompiledTokenizer | None:
        file = self.path / COMPILED_TOKENIZER_FILE
        if not file.is_file():
            return None
        try:
            return CompiledTokenizer(file, self.path / "tokenizer.json")
        except ModelLoadError as e:
            logger.warning("%s; parsing tokenizer.json instead", e)
            return None

    def _refuse_plain_loading(self) -> WeightIterator:
        raise ModelLoadError(
            f"{self.path}: an artifact's weights are in kiln's runtime layout; load it with "
            "LLM(path) or --model path, not as a Hugging Face checkpoint"
        )

    def build_model(self, config: ModelConfig, device: torch.device) -> CausalLM:
        """A ready model: allocated, its tensors read from the artifact, prepared for
        inference on ``device``."""
        m = self.manifest
        if m.tp_degree > 1:
            raise ModelLoadError(
                f"{self.path}: pre-sharded for tp={m.tp_degree}; its ranks load it "
                "(build_rank_model), one process cannot"
            )
        model = allocate_model(config, self.dtype, device, m.sequence_length)
        if m.quantized_layers:
            kernels = cpu_kernels()
            if kernels is None:
                raise ModelLoadError(
                    f"{self.path}: holds quantized layers, and kiln's quantized CPU kernels "
                    "cannot run here (they need x86-64 Linux with AVX2 and a C compiler)"
                )
            if m.tied_head_bits is not None:
                # The head's own copy was made at export (quantize_tied_head); give it a layer
                # to load into.
                model.lm_head = Linear(config.hidden_size, config.vocab_size)
            model.quantize_linears(m.quantized_layers, kernels)
            if m.embedding_from_head and not model.embed_from_head(check=False):
                raise ModelLoadError(
                    f"{self.path}: says its embedding is read from a quantized tied head, "
                    "which this model does not have"
                )
        with torch.no_grad():
            file = self.rank_file(0)
            _load_runtime_tensors(model, file, device, self._map(file))
        return prepare_for_inference(model, device)

    def rank_file(self, rank: int) -> Path:
        """The file holding ``rank``'s part of the weights."""
        return self.path / self.manifest.weights_files[rank]

    def prefetch(self) -> None:
        """Start reading the weights a one-process load maps into memory, in the background:
        called before the tokenizer is parsed and the modules are built, so a weights file
        that is not in the page cache is read from disk meanwhile, and one that is has its
        pages mapped before the first step touches them."""
        if self.manifest.tp_degree != 1:
            return
        file = self.rank_file(0)
        size, available = file.stat().st_size, available_memory()
        if available is not None and size > available:
            # Reading it all would evict its own first pages again: they fault in as used.
            logger.info(
                "%s: %.1f GiB of weights, %.1f GiB of memory available: not read ahead",
                file,
                size / 2**30,
                available / 2**30,
            )
            return
        populate_in_background(self._map(file))

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            self._maps[file] = open_map(file)
        return self._maps[file]

    def build_rank_model(self, config: ModelConfig, group: TensorParallelGroup) -> CausalLM:
        """``group.rank``'s shard on the CPU, its tensors read from the rank's own file as
        stored: no other rank's bytes are read and nothing is sliced. As for a checkpoint
        (:func:`~kiln.parallel.shard.load_rank_model`), the caller moves it to its device,
        ties its head and prepares it for inference."""
        m = self.manifest
        if group.world_size != m.tp_degree:
            raise ConfigError(
                f"{self.path}: exported for tp={m.tp_degree}, loading with tp={group.world_size}"
            )
        # The same module tree as a rank loading a checkpoint: the file's names and shapes are
        # checked against it tensor by tensor.
        model, _ = allocate_rank_model(config, self.dtype, group, m.sequence_length)
        with torch.no_grad():
            _load_runtime_tensors(model, self.rank_file(group.rank), torch.device("cpu"))
        return model


def open_artifact(model: str | None) -> Artifact | None:
    """The artifact ``model`` names, or None when it is not a directory holding one."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    manifest = read_manifest(path)
    return None if manifest is None else Artifact(path, manifest)


def _load_runtime_tensors(
    model: CausalLM, file: Path, device: torch.device, mapped: mmap.mmap | None = None
) -> None:
    """Put every tensor of ``file`` in its place, checking names, shapes and dtypes; the
    quantized layers take their packed ``qblocks`` as they are."""
    modules = dict(model.named_modules())
    linears = model.linear_layers()
    expected = {
        name
        for name in model.state_dict()
        if not name.endswith((".qcodes", ".qscales", ".qoffsets"))
    } | {f"{name}.qblocks" for name, layer in linears.items() if layer.bits}
    tensors = map_safetensors(file, mapped)
    names = set(tensors)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ModelLoadError(
            f"{file}: does not match the model its config describes "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]})"
        )
    for name in sorted(names):
        owner, _, attr = name.rpartition(".")
        tensor = tensors[name].to(device)
        if attr == "qblocks":
            _set_qblocks(linears[owner], tensor, f"{file}: {name}")
            continue
        target = getattr(modules[owner], attr)
        if target.shape != tensor.shape or target.dtype != tensor.dtype:
            raise ModelLoadError(
                f"{file}: {name} is {tensor.dtype} {tuple(tensor.shape)}, the model "
                f"expects {target.dtype} {tuple(target.shape)}"
            )
        # NOTE: take the read tensor's storage instead of copying into the allocated one.
        target.data = tensor


# safetensors' dtype names (its format spec) for the dtypes an artifact can hold.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def open_map(file: Path) -> mmap.mmap:
    """A private (copy-on-write) memory map of all of ``file``."""
    try:
        with open(file, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"{file}: cannot read ({e})") from None


def available_memory() -> int | None:
    """Bytes the kernel reckons can be used without swapping (``MemAvailable`` in
    /proc/meminfo), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels refuse it (EINVAL): pages fault in lazily


def populate_in_background(mapped: mmap.mmap) -> threading.Thread | None:
    """Read and map every page of ``mapped`` in a daemon thread, without the GIL: kiln's
    ``kiln_populate`` where its CPU kernels run (it also reads a byte of each page, which on a
    VM took a first-read cost of up to ~0.1 s off the first request), else ``madvise`` with
    ``MADV_POPULATE_READ`` through ctypes.

    Why not ``MADV_WILLNEED`` or ``posix_fadvise(WILLNEED)``: measured on a 200 MiB artifact
    dropped from the page cache, touching every page after either took as long as without
    them (0.09 s), while populating read it all in one call."""
    if len(mapped) == 0:
        return None
    # NOTE: the exported buffer pins the map (it can no longer be closed or resized), which
    # the tensors viewing it need anyway.
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    populate = _populate_function()
    calling = threading.Event()

    def run() -> None:
        calling.set()
        populate(address, len(mapped))

    thread = threading.Thread(target=run, name="kiln-weights-prefetch", daemon=True)
    thread.start()
    # NOTE: wait until the thread is about to call: a new thread needs the GIL to get there,
    # and the tokenizer parse that follows holds it throughout, so the read started only after
    # it (measured from disk: the first step then waited ~0.09 s in about half of the starts).
    # The thread keeps the GIL from set() to the call, which releases it.
    calling.wait()
    return thread


def _populate_function() -> Callable[[int, int], object]:
    kernels = cpu_kernels()
    if kernels is not None:
        return kernels.populate
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return lambda address, length: madvise(address, length, _MADV_POPULATE_READ)


def map_safetensors(file: Path, mapped: mmap.mmap | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``file``, by name, as a view of one memory map of it
    (``mapped``, a map :func:`open_map` made of it, or a new one):
    no byte is read or copied here, pages are read on first touch (the embedding's rows that
    no prompt uses never are).

    Why not ``safe_open``: its ``get_tensor`` copies each tensor out of its own map, which
    was most of loading an artifact's tensors. The map is private (copy-on-write), so an
    in-place op on a weight copies the touched pages instead of writing the file, and a view
    behaves like any other tensor. Each tensor holds a reference to the map, which stays
    mapped until the last of them is freed (it is never closed here: closing would leave
    the tensors pointing at unmapped memory). A tensor whose offset is not a multiple of its
    element size (the safetensors writer aligns them, so only a hand-made file) is copied.
    kiln never rewrites an artifact's file in place (export and registry pulls stage a
    directory and rename it), so a replaced or deleted artifact leaves the mapped bytes intact.
    """
    if mapped is None:
        mapped = open_map(file)
    size = len(mapped)
    header_size = int.from_bytes(mapped[:8], "little") if size >= 8 else 0
    try:
        if not 0 < header_size <= size - 8:
            raise ValueError(f"header size {header_size} in a {size}-byte file")
        header = json.loads(mapped[8 : 8 + header_size])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ModelLoadError(f"{file}: cannot read (not a safetensors file: {e})") from None
    base = 8 + header_size
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = _view_tensor(mapped, base, info)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{file}: {name}: malformed safetensors entry ({e})") from None
    return tensors


def _view_tensor(mapped: mmap.mmap, base: int, info: dict[str, Any]) -> torch.Tensor:
    dtype = _SAFETENSORS_DTYPES[str(info["dtype"])]
    shape = [int(n) for n in info["shape"]]
    start, end = (int(n) for n in info["data_offsets"])
    count = math.prod(shape)
    itemsize = dtype.itemsize
    if end - start != count * itemsize or not 0 <= start <= end <= len(mapped) - base:
        raise ValueError(f"data_offsets {start}..{end} do not hold {count} x {dtype}")
    if count == 0:  # frombuffer refuses an empty range
        return torch.empty(shape, dtype=dtype)
    offset = base + start
    if offset % itemsize:
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=offset)
        return raw.clone().view(dtype).view(shape)
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset).view(shape)


def _set_qblocks(layer: Linear, blocks: torch.Tensor, where: str) -> None:
    out_features, in_features = layer.weight_shape()
    shape = (out_features, in_features // GROUP_SIZE * BLOCK_BYTES[layer.bits])
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != shape:
        raise ModelLoadError(
            f"{where} is {blocks.dtype} {tuple(blocks.shape)}, a {layer.bits}-bit layer "
            f"expects torch.uint8 {shape}"
        )
    layer.qblocks = blocks
    # The unpacked loading buffers quantize_to allocated are never written: drop them as
    # finish_loading would.
    layer.qcodes = layer.qscales = layer.qoffsets = None
