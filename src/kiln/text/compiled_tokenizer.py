"""A byte-level BPE tokenizer compiled ahead of time (by ``kiln export``) into arrays that load
in about a millisecond, giving the same ids and text as ``tokenizers`` for it.

Why: ``tokenizers`` parses a 49k-token ``tokenizer.json`` in 60-100 ms on 2 cores, holding the
GIL throughout, so it cannot overlap anything else a warm start does; it was the largest part
of starting an exported SmolLM2. What is slow there is the vocabulary and the merges; the rest
(added tokens, pre-tokenizer, post-processor) loads in under a millisecond. So the compiled
form keeps that rest as a ``tokenizers`` pipeline whose model is a one-word ``WordLevel``
(every pre-tokenized piece becomes that word, its character span in the text kept), and
merges each piece's bytes with the stored merge table in C (``kiln/kernels/bpe.c``, the same
algorithm as ``tokenizers``' BPE). Decoding joins each id's stored bytes.

Only tokenizers whose every step is reproduced exactly are compiled (see
:func:`compile_tokenizer`): a BPE over GPT-2's byte-level alphabet with no normalizer,
pre-tokenizers that split without changing the text, a byte-level decoder. Anything else
(offsets, the vocabulary, the decoder object) comes from the full ``tokenizers`` object,
parsed from ``tokenizer.json`` on first use (:attr:`CompiledTokenizer.full`).
"""

from __future__ import annotations

import ctypes
import json
import operator
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import load_file, save_file

from kiln.errors import ModelLoadError
from kiln.kernels.native import bpe_library
from kiln.text.byte_level import byte_decoder, byte_encoder

COMPILED_TOKENIZER_FILE = "kiln_tokenizer.safetensors"
_FORMAT = "1"
_DTYPES = {
    "merges": np.int32,
    "byte_ids": np.int32,
    "unknown": np.int32,
    "decoded_ends": np.int64,
    "string_ends": np.int64,
    "special": np.uint8,
}
_PIECE = "<kiln-piece>"  # the pipeline's one word: a piece to merge
# Pre-tokenizers whose pieces are spans of the text, unchanged (ByteLevel only remaps bytes).
_SPLITTING_PRE_TOKENIZERS = frozenset({"Split", "Digits", "Punctuation", "Whitespace"})


def compile_tokenizer(backend: tokenizers.Tokenizer, path: Path) -> str | None:
    """Write ``backend`` compiled to ``path``; returns None, or why it cannot be compiled (then
    nothing is written and loaders parse ``tokenizer.json``)."""
    data = json.loads(backend.to_str())
    reason = _unsupported(data)
    if reason is not None:
        return reason
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    encoder = byte_encoder()
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        return "its unknown token is not in its vocabulary"
    merges = _merge_table(model["merges"], vocab)
    if isinstance(merges, str):
        return merges
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    size = max([*vocab.values(), *added]) + 1
    tokens: list[str | None] = [None] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token
    for token_id, entry in added.items():
        tokens[token_id] = entry["content"]
    special = {entry["content"] for entry in added.values() if entry.get("special")}
    decoded = [_byte_level_bytes(t) if t is not None else b"" for t in tokens]
    strings = [t.encode("utf-8") if t is not None else b"" for t in tokens]
    # The pipeline: everything but the model, whose one word stands for any piece; the added
    # tokens are its other words, so that they keep their ids.
    pipeline = dict(data)
    pipeline["model"] = {
        "type": "WordLevel",
        "vocab": {_PIECE: size, **{entry["content"]: i for i, entry in added.items()}},
        "unk_token": _PIECE,
    }
    pipeline["post_processor"] = _ids_only(data.get("post_processor"))
    save_file(
        {
            "merges": np.asarray(merges, dtype=np.int32).reshape(-1, 3),
            # -1: a byte with no token, which becomes the unknown token or nothing, as in BPE.
            "byte_ids": np.asarray([vocab.get(encoder[b], -1) for b in range(256)], np.int32),
            "unknown": np.asarray(
                [vocab[unk] if unk is not None else -1, bool(model.get("fuse_unk"))], np.int32
            ),
            "decoded": _joined(decoded),
            "decoded_ends": np.cumsum([len(b) for b in decoded], dtype=np.int64),
            "strings": _joined(strings),
            "string_ends": np.cumsum([len(b) for b in strings], dtype=np.int64),
            "present": np.asarray([t is not None for t in tokens], dtype=np.uint8),
            "special": np.asarray([t in special for t in tokens], dtype=np.uint8),
        },
        str(path),
        metadata={
            "format": _FORMAT,
            "pipeline": json.dumps(pipeline, ensure_ascii=False),
            # As tokenizers counts them (with added tokens: distinct tokens, not the top id).
            "vocab_sizes": json.dumps([backend.get_vocab_size(b) for b in (False, True)]),
        },
    )
    return None


def _unsupported(data: dict[str, Any]) -> str | None:
    """Why ``data`` (a tokenizer.json) is not one :func:`compile_tokenizer` reproduces."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("ignore_merges") or model.get("byte_fallback"):
        return "its BPE uses dropout, ignore_merges or byte fallback"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE marks subwords"
    if data.get("normalizer") is not None:
        return "it has a normalizer"
    if data.get("truncation") is not None or data.get("padding") is not None:
        return "it truncates or pads"
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if (
        not steps
        or steps[-1].get("type") != "ByteLevel"
        or steps[-1].get("add_prefix_space")
        or any(step.get("type") not in _SPLITTING_PRE_TOKENIZERS for step in steps[:-1])
    ):
        return "its pre-tokenizer is not byte-level splitting"
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        return "its decoder is not byte-level"
    processor = data.get("post_processor")
    processors = [processor] if processor is not None else []
    if processor is not None and processor.get("type") == "Sequence":
        processors = processor.get("processors") or []
    if any(p.get("type") not in ("ByteLevel", "TemplateProcessing") for p in processors):
        return "its post-processor is not a template"
    return None


def _ids_only(processor: dict[str, Any] | None) -> dict[str, Any] | None:
    """``processor`` without its ByteLevel steps: they only trim offsets, and the pipeline's
    offsets must be the pieces' whole spans."""
    if processor is None or processor.get("type") == "ByteLevel":
        return None
    if processor.get("type") != "Sequence":
        return processor
    kept = [p for p in processor.get("processors") or [] if p.get("type") != "ByteLevel"]
    return {**processor, "processors": kept} if kept else None


def _merge_table(merges: list[Any], vocab: dict[str, int]) -> list[int] | str:
    """(left id, right id, merged id) for each merge, in rank order, as ``tokenizers`` reads
    them: ``"a b"`` strings or ``[a, b]`` pairs."""
    table: list[int] = []
    for merge in merges:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2 or any(p not in vocab for p in parts) or "".join(parts) not in vocab:
            return f"its merge {merge!r} is not over its vocabulary"
        table += (vocab[parts[0]], vocab[parts[1]], vocab[parts[0] + parts[1]])
    return table


def _byte_level_bytes(token: str) -> bytes:
    """What the byte-level decoder makes of ``token``: the bytes its characters stand for, or
    its own UTF-8 where one of them stands for none (an added token such as "<|a b|>")."""
    decoder = byte_decoder()
    if all(c in decoder for c in token):
        return bytes(decoder[c] for c in token)
    return token.encode("utf-8")


def _joined(parts: list[bytes]) -> np.ndarray:
    joined = b"".join(parts)
    # safetensors refuses an empty tensor's data pointer on some versions: keep one byte.
    return np.frombuffer(joined or b"\0", dtype=np.uint8).copy()


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and arrays :func:`compile_tokenizer` wrote to ``path``."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not metadata or metadata.get("format") != _FORMAT:
        raise ModelLoadError(f"{path}: not a compiled tokenizer of format {_FORMAT}")
    arrays = load_file(str(path))
    size = len(arrays["present"])
    # The C side reads these shapes as given: a damaged file must fail here, not there.
    expected = {
        "merges": (len(arrays["merges"]), 3),
        "byte_ids": (256,),
        "unknown": (2,),
        "decoded_ends": (size,),
        "string_ends": (size,),
        "special": (size,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != _DTYPES[name]:
            raise ModelLoadError(f"{path}: {name} is {arrays[name].dtype} {arrays[name].shape}")
    return metadata, arrays


class _Merger:
    """The C merge table (kiln_bpe) over one compiled tokenizer's merges."""

    def __init__(
        self, library: ctypes.CDLL, merges: np.ndarray, byte_ids: np.ndarray, unknown: np.ndarray
    ) -> None:
        library.kiln_bpe_new.restype = ctypes.c_void_p
        library.kiln_bpe_new.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [
            ctypes.c_int32
        ] * 2
        library.kiln_bpe_free.argtypes = [ctypes.c_void_p]
        library.kiln_bpe_encode.restype = ctypes.c_int64
        library.kiln_bpe_encode.argtypes = (
            [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
        )
        merges = np.ascontiguousarray(merges, dtype=np.int32)
        byte_ids = np.ascontiguousarray(byte_ids, dtype=np.int32)
        self._library = library
        unk_id, fuse_unk = (int(v) for v in unknown)
        self._table = library.kiln_bpe_new(
            merges.ctypes.data, len(merges), byte_ids.ctypes.data, unk_id, fuse_unk
        )
        if not self._table:
            raise MemoryError("kiln_bpe_new")

    def __del__(self) -> None:
        if getattr(self, "_table", None):
            self._library.kiln_bpe_free(self._table)

    def merge(self, data: bytes, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the pieces of ``data`` (``spans``: [pieces, 2] byte ranges, in order and
        apart) and how many each piece gave."""
        spans = np.ascontiguousarray(spans, dtype=np.int64)
        out = np.empty(len(data), dtype=np.int32)
        counts = np.empty(len(spans), dtype=np.int64)
        written = self._library.kiln_bpe_encode(
            self._table, data, spans.ctypes.data, len(spans), out.ctypes.data, counts.ctypes.data
        )
        if written < 0:
            raise MemoryError("kiln_bpe_encode")
        return out[:written], counts


class CompiledTokenizer:
    """A tokenizer loaded from :func:`compile_tokenizer`'s file, with the methods of
    ``tokenizers.Tokenizer`` that :class:`~kiln.text.tokenizer.Tokenizer` encodes and decodes
    with. ``full`` is the ``tokenizers`` object itself, parsed from ``tokenizer_json`` on
    first use."""

    def __init__(self, path: Path, tokenizer_json: Path) -> None:
        library = bpe_library()
        if library is None:
            raise ModelLoadError(f"{path}: kiln's BPE merging cannot be built here")
        try:
            metadata, arrays = _read(path)
            self._pipeline = tokenizers.Tokenizer.from_str(metadata["pipeline"])
            sizes = json.loads(metadata["vocab_sizes"])
            self._vocab_sizes = {False: int(sizes[0]), True: int(sizes[1])}
            self._piece_id = len(arrays["present"])
            self._merger = _Merger(library, arrays["merges"], arrays["byte_ids"], arrays["unknown"])
            self._decoded = arrays["decoded"].tobytes()
            self._decoded_starts = [0, *arrays["decoded_ends"].tolist()]
            self._strings, self._string_ends = arrays["strings"], arrays["string_ends"]
            # bytes: indexing one is the fastest per-id look-up decode can make.
            self._present = arrays["present"].tobytes()
            self._special = arrays["special"].tobytes()
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors and tokenizers raise bare exceptions
            raise ModelLoadError(f"{path}: not a compiled tokenizer kiln can read ({e})") from e
        self._tokenizer_json = tokenizer_json
        self._full: tokenizers.Tokenizer | None = None
        self._full_lock = threading.Lock()

    @property
    def full(self) -> tokenizers.Tokenizer:
        """The ``tokenizers`` object for what the compiled form does not do (offsets, the whole
        vocabulary, the decoder object): parsed on first use."""
        with self._full_lock:
            if self._full is None:
                self._full = tokenizers.Tokenizer.from_file(str(self._tokenizer_json))
            return self._full

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizers.Tokenizer.encode(text, add_special_tokens=...).ids``."""
        encoding = self._pipeline.encode(text, add_special_tokens=add_special_tokens)
        token_ids = np.asarray(encoding.ids, dtype=np.int64)
        pieces = token_ids == self._piece_id
        if not pieces.any():
            return encoding.ids
        spans = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)[pieces]
        data = text.encode("utf-8")
        if len(data) != len(text):  # not all ASCII: character offsets to byte offsets
            code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
            spans = np.concatenate(([0], np.cumsum(widths)))[spans]
        merged, counts = self._merger.merge(data, spans)
        if pieces.all():
            return merged.tolist()
        # Each piece's place takes its merged ids; the other tokens (added tokens, the
        # post-processor's) stay where they are.
        per_token = np.ones(len(token_ids), dtype=np.int64)
        per_token[pieces] = counts
        kept_at = np.cumsum(per_token)[~pieces] - 1
        out = np.empty(int(per_token.sum()), dtype=np.int64)
        from_pieces = np.ones(len(out), dtype=bool)
        from_pieces[kept_at] = False
        out[from_pieces] = merged
        out[kept_at] = token_ids[~pieces]
        return out.tolist()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """``tokenizers.Tokenizer.decode``: unknown ids are left out, as there."""
        starts, data = self._decoded_starts, self._decoded
        size, present, special = self._piece_id, self._present, self._special
        parts = []
        for token_id in ids:
            token_id = operator.index(token_id)  # a float is a TypeError, as in tokenizers
            if not 0 <= token_id < size:
                if not 0 <= token_id < 1 << 32:  # what tokenizers' u32 refuses
                    raise OverflowError(f"token id {token_id} is not a 32-bit unsigned integer")
                continue
            if not present[token_id] or (skip_special_tokens and special[token_id]):
                continue
            parts.append(data[starts[token_id] : starts[token_id + 1]])
        return b"".join(parts).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self._piece_id or not self._present[token_id]:
            return None
        start = int(self._string_ends[token_id - 1]) if token_id else 0
        return self._strings[start : int(self._string_ends[token_id])].tobytes().decode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        """An added token's id from the pipeline (the special tokens a Tokenizer looks up as
        it starts); any other token's from the full tokenizer."""
        token_id = self._pipeline.token_to_id(token)
        if token_id is not None and token_id != self._piece_id:
            return token_id
        return self.full.token_to_id(token)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._vocab_sizes[bool(with_added_tokens)]
