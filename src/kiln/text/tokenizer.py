"""Tokenizer: a `tokenizers.Tokenizer` plus its ``tokenizer_config.json``, behaving like
transformers' fast tokenizer for that config (same ids in, same text out)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any, overload

import tokenizers

from kiln.errors import ModelLoadError
from kiln.text.chat_template import config_chat_template
from kiln.text.compiled_tokenizer import CompiledTokenizer

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order: `all_special_ids` follows it.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# NOTE: only these transformers fast tokenizers rebuild their post-processor from the config's
# `add_bos_token` / `add_eos_token` (they define `update_post_processor`); the others (GPT2,
# Qwen2, plain PreTrainedTokenizerFast...) store the flags and ignore them, so for those the
# tokenizer.json post-processor alone decides, and so do we.
_CLASSES_HONOURING_ADD_FLAGS = frozenset(
    {
        "LlamaTokenizer",
        "CodeLlamaTokenizer",
        "GemmaTokenizer",
        "GPTNeoXTokenizer",
        "CohereTokenizer",
    }
)


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialised AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: undo the spaces old BERT-style vocabularies put
    before punctuation. Applied only when the config asks for it."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """Encode/decode text for one checkpoint.

    Args:
        tokenizer: the backend from ``tokenizer.json`` (never mutated: adjustments are made on
            a private copy, since the Checkpoint's object may be shared), or an artifact's
            compiled form of it (compiled from the adjusted backend: it encodes and decodes,
            and the backend is parsed and adjusted only when something else is asked of it).
        tokenizer_config: ``tokenizer_config.json`` contents.

    Chat prompts: a rendered chat template already contains whatever BOS text the model wants
    (most templates start with ``{{ bos_token }}``), so encode it with :meth:`encode_chat`
    (``add_special_tokens=False``), exactly like transformers'
    ``apply_chat_template(tokenize=True)``; :meth:`encode` with the default
    ``add_special_tokens=True`` would add a second BOS.
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer | CompiledTokenizer, tokenizer_config: dict[str, Any]
    ) -> None:
        self.tokenizer_config = dict(tokenizer_config)
        self._special_tokens_map = self._read_special_tokens_map(self.tokenizer_config)
        self._compiled: CompiledTokenizer | None = None
        self._prepared: tokenizers.Tokenizer | None = None
        self._preparing = threading.Lock()
        if isinstance(tokenizer, CompiledTokenizer):
            self._compiled = tokenizer
        else:
            self._prepared = self._prepare_backend(tokenizer, self.tokenizer_config)
        # What encodes and decodes: the compiled form where there is one.
        self._backend: tokenizers.Tokenizer | CompiledTokenizer = (
            self._compiled if self._compiled is not None else self._prepared
        )

        self._bos_token_id = self._id_of(self.bos_token)
        self._eos_token_id = self._id_of(self.eos_token)
        self._pad_token_id = self._id_of(self._special_tokens_map.get("pad_token"))
        # None: the backend's post-processor decides; True/False: we add the token ourselves.
        self._add_bos, self._add_eos = self._special_token_policy(self.tokenizer_config)
        if self._add_bos and self._bos_token_id is None:
            raise ModelLoadError("tokenizer_config sets add_bos_token but has no usable bos_token")
        if self._add_eos and self._eos_token_id is None:
            raise ModelLoadError("tokenizer_config sets add_eos_token but has no usable eos_token")
        self._clean_up_spaces = bool(self.tokenizer_config.get("clean_up_tokenization_spaces"))

    # --- construction helpers -------------------------------------------------------------

    @staticmethod
    def _read_special_tokens_map(config: dict[str, Any]) -> dict[str, Any]:
        """What transformers calls `special_tokens_map`: the named special tokens that are set."""
        tokens: dict[str, Any] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                tokens[key] = content
        extra = [_token_content(t) for t in config.get("additional_special_tokens") or []]
        if extra:
            tokens["additional_special_tokens"] = [t for t in extra if t is not None]
        return tokens

    def _prepare_backend(
        self, backend: tokenizers.Tokenizer, config: dict[str, Any]
    ) -> tokenizers.Tokenizer:
        """Apply what transformers' PreTrainedTokenizerFast.__init__ does to the backend:
        no truncation/padding, special tokens from the config registered as added tokens,
        `add_prefix_space` from the config. Works on a copy, and only when something changes."""
        copy: tokenizers.Tokenizer | None = None

        def writable() -> tokenizers.Tokenizer:
            nonlocal copy
            if copy is None:
                copy = tokenizers.Tokenizer.from_str(backend.to_str())
            return copy

        if backend.truncation is not None:
            writable().no_truncation()
        if backend.padding is not None:
            writable().no_padding()

        # Special tokens that the config names but tokenizer.json does not register as added
        # tokens would otherwise be split into pieces by encode() and kept by decode().
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        to_add: list[tokenizers.AddedToken] = []
        for _, entry in sorted(
            (config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])
        ):
            content = entry.get("content")
            if content and content not in added:
                to_add.append(
                    tokenizers.AddedToken(
                        content,
                        single_word=entry.get("single_word", False),
                        lstrip=entry.get("lstrip", False),
                        rstrip=entry.get("rstrip", False),
                        normalized=entry.get("normalized", not entry.get("special", False)),
                        special=entry.get("special", False),
                    )
                )
                added.add(content)
        for content in self._special_token_strings():
            if content not in added:
                to_add.append(tokenizers.AddedToken(content, special=True, normalized=False))
                added.add(content)
        if to_add:
            writable().add_tokens(to_add)

        if "add_prefix_space" in config and backend.pre_tokenizer is not None:
            # Mirrors transformers: rebuild the pre-tokenizer when the config disagrees with it.
            state = json.loads(backend.pre_tokenizer.__getstate__())
            wanted = bool(config["add_prefix_space"])
            if "add_prefix_space" in state and state["add_prefix_space"] != wanted:
                kind = state.pop("type")
                state["add_prefix_space"] = wanted
                pre_tokenizer_class = getattr(tokenizers.pre_tokenizers, kind, None)
                if pre_tokenizer_class is not None:
                    writable().pre_tokenizer = pre_tokenizer_class(**state)

        return copy if copy is not None else backend

    @staticmethod
    def _special_token_policy(config: dict[str, Any]) -> tuple[bool | None, bool | None]:
        """Whether we add BOS/EOS ourselves (True/False) or leave it to the post-processor
        (None)."""
        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class is not None:
            base = tokenizer_class.removesuffix("Fast")
            if base not in _CLASSES_HONOURING_ADD_FLAGS:
                return None, None
        has_flags = "add_bos_token" in config or "add_eos_token" in config
        if not has_flags:
            return None, None
        # transformers' LlamaTokenizerFast defaults: add_bos_token=True, add_eos_token=False.
        return bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))

    def _special_token_strings(self) -> list[str]:
        """transformers' `all_special_tokens`: named ones then additional ones, deduplicated."""
        seen: dict[str, None] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            if key in self._special_tokens_map:
                seen.setdefault(self._special_tokens_map[key], None)
        for token in self._special_tokens_map.get("additional_special_tokens", []):
            seen.setdefault(token, None)
        return list(seen)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # --- encode / decode ------------------------------------------------------------------

    def _encode_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._compiled is not None:
            return self._compiled.encode_ids(text, add_special_tokens=add_special_tokens)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`, with BOS/EOS added the way transformers would for this config."""
        if not add_special_tokens:
            return self._encode_ids(text, add_special_tokens=False)
        if self._add_bos is None:
            return self._encode_ids(text, add_special_tokens=True)
        # NOTE: the config overrides the post-processor here (LlamaTokenizerFast rebuilds it as
        # "[bos] $A [eos]" from the flags); adding the ids ourselves avoids mutating the backend.
        ids = self._encode_ids(text, add_special_tokens=False)
        if self._add_bos:
            ids.insert(0, self._bos_token_id)
        if self._add_eos:
            ids.append(self._eos_token_id)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """What :meth:`encode` gives, with each token's ``[start, stop)`` character span in
        ``text`` (a BOS or EOS that kiln adds itself spans nothing), from one encoding."""
        encoding = self.backend.encode(text, add_special_tokens=self._add_bos is None)
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        if self._add_bos:
            ids.insert(0, self._bos_token_id)  # type: ignore[arg-type]
            offsets.insert(0, (0, 0))
        if self._add_eos:
            ids.append(self._eos_token_id)  # type: ignore[arg-type]
            offsets.append((len(text), len(text)))
        return ids, offsets

    def encode_chat(self, rendered_prompt: str) -> list[int]:
        """Ids for a rendered chat template: no special tokens added, since the template already
        wrote them as text (transformers' `apply_chat_template(tokenize=True)` does the same)."""
        return self._encode_ids(rendered_prompt, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def decode_raw(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The backend's decode without transformers' optional space clean-up: what the
        incremental detokenizer diffs, since the clean-up is not prefix-stable."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @overload
    def convert_ids_to_tokens(self, ids: int) -> str | None: ...
    @overload
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]: ...
    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str | None] | None:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # --- properties -----------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers`` object, adjusted to the config (for a compiled tokenizer: parsed
        from ``tokenizer.json`` on first use)."""
        if self._prepared is None:
            with self._preparing:
                if self._prepared is None:
                    assert self._compiled is not None
                    self._prepared = self._prepare_backend(
                        self._compiled.full, self.tokenizer_config
                    )
        return self._prepared

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included: transformers' ``len(tok)``
        (its ``vocab_size`` attribute leaves added tokens out, which is not what a sampler or an
        id validator wants)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        ids: dict[int, None] = {}
        for token in self._special_token_strings():
            token_id = self._backend.token_to_id(token)
            if token_id is not None:
                ids.setdefault(token_id, None)
        return list(ids)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """Named special tokens as strings: what transformers passes to chat templates."""
        return {
            k: (list(v) if isinstance(v, list) else v) for k, v in self._special_tokens_map.items()
        }

    @property
    def chat_template(self) -> str | None:
        """The config's default chat template source, if it has one."""
        return config_chat_template(self.tokenizer_config)
