"""A ``tokenizers.Tokenizer`` rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata.

Two vocabulary kinds cover llama and qwen2 GGUFs:

- ``gpt2``: byte-level BPE with explicit merges; ``tokenizer.ggml.pre`` names the regex that
  splits text into words before BPE (llama.cpp's ``llama-vocab.cpp`` is the reference).
- ``llama``: SentencePiece BPE. There are no merges, only per-piece scores; SentencePiece merges
  the adjacent pair whose result scores highest, which is BPE with merges ranked by the score of
  the merged piece. Spaces become ``▁``, one is prepended, unknown bytes fall back to ``<0xNN>``.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from kiln.errors import ModelLoadError

logger = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPIECE_SPACE = "▁"

# Pre-tokenizer regexes from llama.cpp (llama-vocab.cpp), keyed by tokenizer.ggml.pre.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen", "megrez"}
# GPT-2's regex after splitting off every digit on its own (SmolLM, StarCoder...).
_DIGIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GPT2_PRES = {"default", "gpt-2", "gpt2", "phi-2", "olmo", "jais", "mpt", "trillion"}


def build_tokenizer(
    meta: dict[str, Any], *, architecture: str, source: str = "GGUF"
) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer and a ``tokenizer_config.json``-like dict for a GGUF file's metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{source}: GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    token_types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise ModelLoadError(f"{source}: tokenizer.ggml.token_type and tokens differ in length")
    ids = {key: _token_id(meta, key, len(tokens)) for key in ("bos", "eos", "unknown", "padding")}
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, source)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, token_types, ids["unknown"], source)
    else:
        raise ModelLoadError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported (kiln reads 'gpt2' and "
            "'llama' vocabularies)"
        )
    added = _add_special_tokens(tokenizer, tokens, token_types, ids["unknown"])
    # transformers loads llama-architecture GGUFs with LlamaTokenizerFast, which adds BOS unless
    # told otherwise; Qwen2's tokenizer never does.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", architecture == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None)
    if post is not None:
        tokenizer.post_processor = post
    config = _tokenizer_config(meta, tokens, ids, added, add_bos, add_eos)
    return tokenizer, config


def _token_id(meta: dict[str, Any], key: str, num_tokens: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    return value if isinstance(value, int) and 0 <= value < num_tokens else None


def _vocab(tokens: list[str]) -> dict[str, int]:
    # Some GGUFs repeat a string (padding placeholders); the first id wins, as in llama.cpp's
    # text -> id map.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _parse_merges(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelLoadError(f"{source}: malformed tokenizer merge {merge!r}")
        pairs.append((left, right))
    return pairs


# --- gpt2: byte-level BPE -----------------------------------------------------------------


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], source: str) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError(f"{source}: gpt2 tokenizer without tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(
        BPE(
            _vocab(tokens),
            _parse_merges(merges, source),
            # Llama 3 looks a whole word up before merging (llama.cpp's ignore_merges).
            ignore_merges=pre in _LLAMA3_PRES,
        )
    )
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    if pre in _QWEN2_PRES:
        tokenizer.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    def split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    if pre in _LLAMA3_PRES:
        return split_then_bytes(_LLAMA3_REGEX)
    if pre in _QWEN2_PRES:
        return split_then_bytes(_QWEN2_REGEX)
    # ByteLevel's built-in regex is GPT-2's.
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), gpt2]
        )
    if pre not in _GPT2_PRES:
        logger.warning("unknown GGUF pre-tokenizer %r; splitting words like GPT-2", pre)
    return gpt2


# --- llama: SentencePiece BPE -------------------------------------------------------------


def _sentencepiece_bpe(
    meta: dict[str, Any],
    tokens: list[str],
    token_types: list[int],
    unk_id: int | None,
    source: str,
) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = _parse_merges(merges, source)
    else:
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        pairs = merges_from_scores(tokens, scores, token_types)
    tokenizer = Tokenizer(
        BPE(
            _vocab(tokens),
            pairs,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp prepends the space to every run of text that follows a special token, which is
    # what a normalizer does (it sees each piece between added tokens separately).
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(_SPIECE_SPACE)] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPIECE_SPACE)])
    undo = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *undo]
    )
    return tokenizer


def merges_from_scores(
    tokens: list[str], scores: list[float], token_types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    Every split of a normal piece into two normal pieces is a merge; merges producing a
    higher-scoring piece rank first (ties: lower piece id, then lower part ids, as transformers'
    SentencePieceExtractor orders them).
    """
    normal = {
        token: i for i, token in enumerate(tokens) if token_types[i] == NORMAL and len(token) > 0
    }
    ranked = []
    for piece, piece_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append(
                    (-scores[piece_id], piece_id, normal[left], normal[right], left, right)
                )
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --- shared -------------------------------------------------------------------------------


def _add_special_tokens(
    tokenizer: Tokenizer, tokens: list[str], token_types: list[int], unk_id: int | None
) -> dict[int, AddedToken]:
    """Register control / unknown / user-defined pieces as added tokens (matched whole, never
    split by BPE). Control and unknown pieces are special (skipped when decoding with
    ``skip_special_tokens``); user-defined ones are not, as llama.cpp always prints them."""
    added: dict[int, AddedToken] = {}
    for i, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        special = token_type in (CONTROL, UNKNOWN) or i == unk_id
        if special or token_type == USER_DEFINED:
            added[i] = AddedToken(token, special=special, normalized=False)
    specials = [tok for tok in added.values() if tok.special]
    plain = [tok for tok in added.values() if not tok.special]
    if specials:
        tokenizer.add_special_tokens(specials)
    if plain:
        tokenizer.add_tokens(plain)
    return added


def _post_processor(
    tokens: list[str], bos_id: int | None, eos_id: int | None
) -> TemplateProcessing | None:
    """BOS/EOS added by ``encode(..., add_special_tokens=True)``, like an HF tokenizer.json."""
    if bos_id is None and eos_id is None:
        return None
    prefix = [tokens[bos_id]] if bos_id is not None else []
    suffix = [tokens[eos_id]] if eos_id is not None else []
    specials = [(tokens[i], i) for i in dict.fromkeys([bos_id, eos_id]) if i is not None]
    return TemplateProcessing(
        single=[*prefix, "$A:0", *suffix],
        pair=[*prefix, "$A:0", *suffix, *prefix, "$B:1", *suffix],
        special_tokens=specials,
    )


def _tokenizer_config(
    meta: dict[str, Any],
    tokens: list[str],
    ids: dict[str, int | None],
    added: dict[int, AddedToken],
    add_bos: bool,
    add_eos: bool,
) -> dict[str, Any]:
    def text(token_id: int | None) -> str | None:
        return tokens[token_id] if token_id is not None else None

    config: dict[str, Any] = {
        "bos_token": text(ids["bos"]),
        "eos_token": text(ids["eos"]),
        "unk_token": text(ids["unknown"]),
        "pad_token": text(ids["padding"]),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": tok.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": tok.special,
            }
            for i, tok in added.items()
        },
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return config
