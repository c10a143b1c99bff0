"""One streaming client per wire API: TGI's ``/generate_stream``, OpenAI's
``/v1/chat/completions`` and ``/v1/completions``.

Each request is streamed, so TTFT and inter-token latency are measured where the client sees
them. Token counts come from the server's usage when it reports it (OpenAI ``include_usage``,
TGI's final ``details``), else they are counted: TGI streams one token per event; OpenAI
chunks are counted with the model's tokenizer when there is one. Every failure becomes a
record with an error kind, never an exception: a load test reports errors, it does not stop
at the first.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from kiln.loadtest.metrics import RequestRecord, apportion
from kiln.loadtest.workload import Prompt, TokenCounter

APIS = ("tgi", "openai-chat", "openai-completions")


@dataclass
class _Chunk:
    """What one stream event says: text (and how many tokens, when the API says so), usage,
    an error, or the end of the answer."""

    text: str = ""
    num_tokens: int | None = None
    usage_input: int | None = None
    usage_output: int | None = None
    error: str | None = None
    final: bool = False


class ApiClient:
    """Builds one API's request bodies and reads its stream events.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8080``.
        model: the model name OpenAI bodies carry (TGI serves one model and has no field).
        counter: the model's tokenizer, to count what the server does not report.
        ignore_eos: ask for exactly max_new_tokens where the API has the field (vLLM, kiln,
            llama.cpp); a server that rejects the field is asked again without it.
        temperature: sampling temperature; None leaves the server's default.
        request_timeout: seconds a whole request may take before it counts as a timeout.
    """

    path = ""
    # Optional body fields a server may reject; each is dropped for the rest of the run the
    # first time a 400/422 names it, and the run's notes say so.
    optional_fields: tuple[str, ...] = ()

    def __init__(
        self,
        base_url: str,
        model: str | None,
        counter: TokenCounter | None,
        ignore_eos: bool = True,
        temperature: float | None = None,
        request_timeout: float = 300.0,
    ) -> None:
        self.url = base_url.rstrip("/") + self.path
        self.model, self.counter = model, counter
        self.ignore_eos, self.temperature = ignore_eos, temperature
        self.request_timeout = request_timeout
        self.dropped: set[str] = set()
        self.notes: list[str] = []

    def body(self, prompt: Prompt) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, data: dict[str, Any]) -> _Chunk:
        raise NotImplementedError

    @property
    def counts_chat(self) -> bool:
        """Whether prompts go out as chat messages (counted without special tokens)."""
        return False

    def _body(self, prompt: Prompt) -> dict[str, Any]:
        body = self.body(prompt)
        for name in self.dropped:
            body.pop(name, None)
        return body

    async def send(self, http: httpx.AsyncClient, prompt: Prompt, origin: float) -> RequestRecord:
        """Send ``prompt`` and stream the answer; ``origin`` is the run's perf_counter zero."""
        record = RequestRecord(start=time.perf_counter() - origin, turn=prompt.turn)
        try:
            await asyncio.wait_for(self._stream(http, prompt, record), self.request_timeout)
        except asyncio.TimeoutError:
            record.error, record.error_detail = "timeout", f"over {self.request_timeout:g} s"
        except httpx.ConnectError as e:
            record.error, record.error_detail = "connect", str(e)[:200]
        except httpx.TimeoutException as e:
            record.error, record.error_detail = "timeout", type(e).__name__
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            # The server went away mid-answer (killed, crashed, or closed the connection).
            record.error, record.error_detail = "disconnected", str(e)[:200] or type(e).__name__
        except httpx.HTTPError as e:
            record.error, record.error_detail = "http_error", f"{type(e).__name__}: {e}"[:200]
        except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
            record.error, record.error_detail = "bad_response", f"{type(e).__name__}: {e}"[:200]
        if len(record.event_tokens) != len(record.event_times):
            # Cut off mid-stream: the events that did arrive count one token each.
            record.event_tokens = [1] * len(record.event_times)
            record.output_tokens = len(record.event_times)
        return record

    async def _stream(self, http: httpx.AsyncClient, prompt: Prompt, record: RequestRecord) -> None:
        start = time.perf_counter()
        for _ in range(len(self.optional_fields) + 1):
            async with http.stream("POST", self.url, json=self._body(prompt)) as response:
                if response.status_code == 200:
                    await self._read(response, prompt, record, start)
                    return
                text = (await response.aread()).decode(errors="replace")
                if not self._drop_refused_field(response.status_code, text):
                    record.error = f"http_{response.status_code}"
                    record.error_detail = text[:200]
                    return

    def _drop_refused_field(self, status: int, text: str) -> bool:
        if status not in (400, 422):
            return False
        for name in self.optional_fields:
            if name not in self.dropped and name in text:
                self.dropped.add(name)
                self.notes.append(f"the server refused `{name}`; sent without it")
                return True
        return False

    async def _read(
        self, response: httpx.Response, prompt: Prompt, record: RequestRecord, start: float
    ) -> None:
        texts: list[str] = []
        known: list[int | None] = []
        usage_in = usage_out = None
        final = False
        async for data in sse_data(response):
            if data == "[DONE]":
                final = True
                break
            chunk = self.parse(json.loads(data))
            if chunk.error is not None:
                record.error, record.error_detail = "stream_error", chunk.error[:200]
                break
            if chunk.text or chunk.num_tokens:
                now = time.perf_counter() - start
                if record.ttft is None:
                    record.ttft = now
                record.event_times.append(now)
                texts.append(chunk.text)
                known.append(chunk.num_tokens)
            usage_in = chunk.usage_input if chunk.usage_input is not None else usage_in
            usage_out = chunk.usage_output if chunk.usage_output is not None else usage_out
            final = final or chunk.final
        record.text = "".join(texts)
        self._count(record, prompt, texts, known, usage_in, usage_out)
        if record.error is None:
            if not final:
                record.error = "incomplete_stream"
                record.error_detail = "the stream ended before the answer did"
            else:
                record.e2e = time.perf_counter() - start

    def _count(
        self,
        record: RequestRecord,
        prompt: Prompt,
        texts: list[str],
        known: list[int | None],
        usage_in: int | None,
        usage_out: int | None,
    ) -> None:
        if usage_in is not None:
            record.input_tokens, record.input_source = usage_in, "usage"
        elif prompt.input_tokens is not None:
            record.input_tokens, record.input_source = prompt.input_tokens, "counted"
        if all(k is not None for k in known):
            weights = [int(k or 0) for k in known]
        elif usage_out is not None and usage_out == len(texts):
            weights = [1] * len(texts)  # the common case: one token per chunk
        elif self.counter is not None:
            weights = [self.counter.count(t, special=False) for t in texts]
        else:
            weights = [1] * len(texts)
        if usage_out is not None:
            record.output_tokens, record.output_source = usage_out, "usage"
            record.event_tokens = apportion(weights, usage_out)
        else:
            total = sum(weights)
            if self.counter is not None and not all(k is not None for k in known):
                # Counting the whole text is closer than summing chunk counts: a word split
                # across two chunks is one token, not two.
                total = self.counter.count(record.text, special=False)
            record.output_tokens, record.output_source = total, "counted"
            record.event_tokens = apportion(weights, total)


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` payloads of a server-sent event stream, one string per event."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif not line.strip() and lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


class TgiClient(ApiClient):
    """TGI's ``/generate_stream``: one event per token; the last has ``generated_text`` and,
    with ``details``, the generated (and in newer servers, input) token counts. TGI has no
    ``ignore_eos``: answers may end before max_new_tokens."""

    path = "/generate_stream"

    def body(self, prompt: Prompt) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_new_tokens": prompt.max_new_tokens, "details": True}
        if self.temperature:
            parameters.update(do_sample=True, temperature=self.temperature)
        return {"inputs": prompt.as_text(), "parameters": parameters, "stream": True}

    def parse(self, data: dict[str, Any]) -> _Chunk:
        if "error" in data:
            return _Chunk(error=str(data["error"]))
        token = data.get("token") or {}
        details = data.get("details") or {}
        return _Chunk(
            text=token.get("text") or "",
            num_tokens=1 if token else 0,
            usage_input=details.get("input_length"),
            usage_output=details.get("generated_tokens"),
            final=data.get("generated_text") is not None,
        )


class _OpenAIClient(ApiClient):
    optional_fields = ("ignore_eos", "stream_options")

    def common(self, prompt: Prompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": prompt.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def parse(self, data: dict[str, Any]) -> _Chunk:
        if "error" in data:
            error = data["error"]
            return _Chunk(
                error=str(error.get("message", error) if isinstance(error, dict) else error)
            )
        usage = data.get("usage") or {}
        text = "".join(self.choice_text(c) for c in data.get("choices") or [])
        return _Chunk(
            text=text,
            usage_input=usage.get("prompt_tokens"),
            usage_output=usage.get("completion_tokens"),
        )

    def choice_text(self, choice: dict[str, Any]) -> str:
        raise NotImplementedError


class OpenAIChatClient(_OpenAIClient):
    path = "/v1/chat/completions"

    @property
    def counts_chat(self) -> bool:
        return True

    def body(self, prompt: Prompt) -> dict[str, Any]:
        return {**self.common(prompt), "messages": prompt.messages}

    def choice_text(self, choice: dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        # Reasoning models stream their thinking separately; it is output all the same.
        return (delta.get("reasoning_content") or "") + (delta.get("content") or "")


class OpenAICompletionsClient(_OpenAIClient):
    path = "/v1/completions"

    def body(self, prompt: Prompt) -> dict[str, Any]:
        return {**self.common(prompt), "prompt": prompt.as_text()}

    def choice_text(self, choice: dict[str, Any]) -> str:
        return choice.get("text") or ""


CLIENTS: dict[str, type[ApiClient]] = {
    "tgi": TgiClient,
    "openai-chat": OpenAIChatClient,
    "openai-completions": OpenAICompletionsClient,
}


def served_models(base_url: str) -> list[dict[str, Any]]:
    """``/v1/models``' list, or [] where the server has none (TGI, or it is down)."""
    try:
        response = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0)
        return list(response.json().get("data") or []) if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
