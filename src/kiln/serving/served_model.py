"""ServedModel: what the serving layer needs of one loaded model, and nothing more.

The front ends (TGI, OpenAI, the web app) talk to this narrow view: an async engine to submit
requests to, the tokenizer and chat template to build prompts with, and the limits that decide
what fits. They never reach into :class:`~kiln.llm.LLM` or the engine's internals.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.builder import LoadedEngine
from kiln.llm import LLM
from kiln.serving.defaults import sampling_defaults
from kiln.text.chat_template import ChatTemplate
from kiln.text.history import render_prompt
from kiln.text.tokenizer import Tokenizer

Message = dict[str, Any]


class ServedModel:
    """A loaded model with its engine, and how many requests are pinned to it."""

    def __init__(self, name: str, model: LoadedEngine | LLM) -> None:
        loaded = model.loaded if isinstance(model, LLM) else model
        self.name = name
        self.source = loaded.name
        """Where it was loaded from (path, hub id or kiln's default model's name)."""
        self.engine = AsyncEngine(loaded.engine)
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.config: ModelConfig = loaded.config
        self.device: torch.device = loaded.device
        self.dtype: torch.dtype = loaded.dtype
        self.max_model_len: int = loaded.max_model_len
        self.max_cache_tokens: int = loaded.engine.max_cache_tokens
        """The most tokens (prompt + output) the whole KV cache holds for one request."""
        self.generation_defaults: dict[str, Any] = sampling_defaults(
            loaded.checkpoint.generation_config
        )
        """Sampling defaults from the checkpoint's ``generation_config.json``."""
        self._loaded: LoadedEngine | None = loaded
        self.num_requests = 0
        self._idle: asyncio.Event | None = None

    @property
    def chat_template(self) -> ChatTemplate:
        """The model's chat template (``KilnError`` when the checkpoint has none)."""
        assert self._loaded is not None, "the model was unloaded"
        return self._loaded.chat_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_chat(self, messages: Sequence[Message], max_input_tokens: int) -> list[int]:
        """The conversation rendered with the chat template and tokenized, its oldest
        exchanges dropped until it fits ``max_input_tokens`` (``ContextLengthError`` if even
        the last one alone does not). Blocking: call it off the event loop."""
        _, token_ids, _ = render_prompt(
            self.chat_template, self.tokenizer, messages, max_input_tokens
        )
        return token_ids

    # --- requests pinned to it ------------------------------------------------------------

    def pin(self) -> None:
        self.num_requests += 1

    def unpin(self) -> None:
        self.num_requests -= 1
        if self.num_requests == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no request is pinned to this model (none can be pinned any more)."""
        if self.num_requests:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def unload(self) -> None:
        """Stop the engine and drop the model, so that its memory can be freed (blocks while
        the engine thread ends; unusable after)."""
        self.engine.stop()
        self.engine.engine.shutdown()  # a tensor-parallel engine's workers exit now
        # NOTE: deleted rather than kept: whatever still holds this object (a finished
        # request's pinned model) must not keep the weights and the KV cache alive.
        self._loaded = None
        del self.engine
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
