"""LLM: the Python entry point. ``LLM(model).generate(prompts, params)`` and ``.chat(messages)``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from kiln.config.engine_args import EngineArgs
from kiln.engine.builder import LoadedEngine, build_engine
from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.errors import ConfigError, InvalidRequestError
from kiln.models.base import CausalLM
from kiln.sampling import SamplingParams
from kiln.text.chat_template import ChatTemplate
from kiln.text.history import render_prompt

logger = logging.getLogger(__name__)

Message = dict[str, Any]


class LLM:
    """A loaded model with its tokenizer, chat template and a generation engine: the thin
    synchronous facade over :func:`~kiln.engine.builder.build_engine` and the engine.

    ``LLM(model, **options)``: ``model`` and ``options`` are :class:`~kiln.config.EngineArgs`
    fields (``dtype``, ``device``, ``max_model_len``, ``chat_template``, ``kv_cache_memory``,
    ``max_num_seqs``...; see its docstring, where each is declared once). ``progress`` shows a
    progress bar while loading weights.
    """

    def __init__(self, model: str | None = None, *, progress: bool = False, **options: Any) -> None:
        try:
            args = EngineArgs(model=model, **options)
        except TypeError as e:  # an option EngineArgs does not have
            known = ", ".join(sorted(EngineArgs.option_names()))
            raise ConfigError(f"LLM: {e}; the options are: {known}") from None
        self._adopt(build_engine(args, progress=progress))

    @classmethod
    def from_args(cls, args: EngineArgs, *, progress: bool = False) -> LLM:
        """An LLM built from :class:`EngineArgs` (what the CLI and the server hold)."""
        llm = cls.__new__(cls)
        llm._adopt(build_engine(args, progress=progress))
        return llm

    def _adopt(self, loaded: LoadedEngine) -> None:
        self.loaded = loaded
        """The engine and what was loaded with it (checkpoint, tokenizer, limits)."""
        self.engine = loaded.engine
        self.checkpoint = loaded.checkpoint
        self.model_name = loaded.name
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.max_model_len = loaded.max_model_len
        self._request_counter = itertools.count()

    def shutdown(self) -> None:
        """Stop what the engine runs beside this process (``tp`` > 1: its worker processes,
        which are otherwise stopped when the LLM is garbage-collected or at exit)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def model(self) -> CausalLM:
        return self.engine.runner.model

    @property
    def chat_template(self) -> ChatTemplate:
        """Loaded on first use, so plain-completion users of a template-less model never fail."""
        return self.loaded.chat_template

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Generate for one or many prompts (text or token ids), batched together."""
        prompt_ids = self._as_prompt_ids(prompts)
        params_list = _broadcast(params, len(prompt_ids))
        return self._run_to_completion(list(zip(prompt_ids, params_list, strict=True)))

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding each new piece of text as it is made."""
        (prompt_ids,) = self._as_prompt_ids([prompt] if isinstance(prompt, str) else [list(prompt)])
        request_id = self._add(prompt_ids, params or SamplingParams())
        yield from self._drain(request_id)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        max_input_tokens: int | None = None,
    ) -> CompletionOutput | list[CompletionOutput]:
        """Answer one conversation (a list of messages) or several (a list of such lists)."""
        batched = bool(messages) and isinstance(messages[0], list)
        conversations: list[list[Message]] = messages if batched else [messages]  # type: ignore[assignment]
        prompt_ids = [self.chat_prompt(conv, max_input_tokens)[0] for conv in conversations]
        params_list = _broadcast(params, len(prompt_ids))
        outputs = self._run_to_completion(list(zip(prompt_ids, params_list, strict=True)))
        return outputs if batched else outputs[0]

    def stream_chat(
        self,
        messages: list[Message],
        params: SamplingParams | None = None,
        *,
        max_input_tokens: int | None = None,
    ) -> Iterator[RequestOutput]:
        prompt_ids, _ = self.chat_prompt(messages, max_input_tokens)
        request_id = self._add(prompt_ids, params or SamplingParams())
        yield from self._drain(request_id)

    def chat_prompt(
        self, messages: list[Message], max_input_tokens: int | None = None
    ) -> tuple[list[int], list[Message]]:
        """Render and tokenize a conversation, dropping the oldest exchanges until it fits
        ``max_input_tokens`` (default: the context minus one token to generate)."""
        budget = max_input_tokens or self.max_model_len - 1
        _, prompt_ids, kept = render_prompt(self.chat_template, self.tokenizer, messages, budget)
        return prompt_ids, kept

    def _as_prompt_ids(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("the prompt is empty: give a text or at least one token id")
        if isinstance(prompts[0], int):
            prompts = [prompts]
        prompt_ids = []
        for prompt in prompts:
            # NOTE: checked on the text, not the ids: the tokenizer may turn "" into [BOS].
            if not prompt:
                raise InvalidRequestError(
                    "the prompt is empty: give a text or at least one token id"
                )
            prompt_ids.append(
                self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            )
        return prompt_ids

    def _add(self, prompt_ids: list[int], params: SamplingParams) -> str:
        request_id = str(next(self._request_counter))
        self.engine.add_request(request_id, prompt_ids, params)
        return request_id

    def _drain(self, request_id: str) -> Iterator[RequestOutput]:
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)  # a consumer that stops early frees its blocks

    def _run_to_completion(
        self, requests: list[tuple[list[int], SamplingParams]]
    ) -> list[CompletionOutput]:
        results: dict[str, CompletionOutput] = {}
        order = []
        try:
            # NOTE: inside the try: when one prompt is rejected, those added before it are
            # aborted instead of lingering in the engine and running with the next call.
            for prompt_ids, params in requests:
                request_id = self._add(prompt_ids, params)
                results[request_id] = CompletionOutput(request_id, prompt_ids, "", [], None)
                order.append(request_id)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id in results:
                        results[out.request_id].extend(out)
        finally:
            for request_id in order:
                self.engine.abort(request_id)
        return [results[r] for r in order]


def _broadcast(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
