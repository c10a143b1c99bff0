"""`kiln bench locustfile`: a Locust file for the same workload, for people who prefer Locust.

The prompts are built here (exact token counts need the tokenizer, which the Locust process
should not have to load) and written into the file, so it runs with Locust alone. Each
request streams; besides Locust's own request row (whole-request latency), the file reports
TTFT as a separate "TTFT" row and puts the generated token count in the response length.
"""

from __future__ import annotations

from typing import Any

from kiln.loadtest.workload import Prompt, Workload

_TEMPLATE = '''"""Locust load test written by `kiln bench locustfile`.

    locust -f {filename} --host {host} --users 10 --spawn-rate 10 --run-time 60s --headless

API: {api}; {num_prompts} prompts ({description}); max_new_tokens {max_new_tokens}.
Rows: "{path}" is the whole streamed request (its "size" is the generated tokens), "TTFT" is
the time to the first streamed token.
"""

import json
import time

from locust import HttpUser, constant, task

API = {api!r}
PATH = {path!r}
MODEL = {model!r}
MAX_NEW_TOKENS = {max_new_tokens!r}
IGNORE_EOS = {ignore_eos!r}
PROMPTS = {prompts!r}


def request_body(prompt):
    """The JSON body for one prompt (a list of chat messages) in this API's format."""
    if API == "tgi":
        text = prompt[0]["content"] if len(prompt) == 1 else "\\n".join(
            [m["role"].capitalize() + ": " + m["content"] for m in prompt] + ["Assistant:"]
        )
        parameters = {{"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
        return {{"inputs": text, "parameters": parameters, "stream": True}}
    body = {{
        "model": MODEL,
        "max_tokens": MAX_NEW_TOKENS,
        "stream": True,
        "stream_options": {{"include_usage": True}},
    }}
    if IGNORE_EOS:
        body["ignore_eos"] = True
    if API == "openai-chat":
        body["messages"] = prompt
    else:
        body["prompt"] = prompt[0]["content"] if len(prompt) == 1 else "\\n".join(
            [m["role"].capitalize() + ": " + m["content"] for m in prompt] + ["Assistant:"]
        )
    return body


def event_tokens(event):
    """(tokens in this event as far as it shows, the server's total if it reports one)."""
    if API == "tgi":
        details = event.get("details") or {{}}
        return (1 if event.get("token") else 0), details.get("generated_tokens")
    usage = event.get("usage") or {{}}
    text = ""
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {{}}
        text += choice.get("text") or delta.get("content") or ""
    return (1 if text else 0), usage.get("completion_tokens")


class LLMUser(HttpUser):
    """A closed-loop user: sends the next prompt as soon as the last answer ends."""

    wait_time = constant(0)

    def on_start(self):
        self.next_prompt = 0

    @task
    def generate(self):
        prompt = PROMPTS[self.next_prompt % len(PROMPTS)]
        self.next_prompt += 1
        start = time.perf_counter()
        ttft = None
        streamed = 0
        reported = None
        with self.client.post(
            PATH, json=request_body(prompt), stream=True, catch_response=True, name=PATH
        ) as response:
            if response.status_code != 200:
                response.failure("HTTP %d: %s" % (response.status_code, response.text[:200]))
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    response.failure(str(event["error"])[:200])
                    return
                count, total = event_tokens(event)
                if count and ttft is None:
                    ttft = time.perf_counter() - start
                streamed += count
                reported = total if total is not None else reported
            tokens = reported if reported is not None else streamed
            # Locust's "size" column: generated tokens rather than bytes.
            response.request_meta["response_length"] = tokens
            response.success()
        if ttft is not None:
            self.environment.events.request.fire(
                request_type="TTFT",
                name=PATH,
                response_time=ttft * 1000.0,
                response_length=tokens,
                exception=None,
                context={{}},
            )
'''


def locustfile(
    workload: Workload,
    api: str,
    path: str,
    model: str | None,
    max_new_tokens: int,
    ignore_eos: bool,
    num_prompts: int,
    host: str,
    filename: str,
) -> str:
    """The Locust file's text, with ``num_prompts`` prompts drawn from ``workload``.
    Multi-turn workloads are written as their single turns (Locust users do not carry the
    answers forward)."""
    prompts: list[Any] = []
    for _ in range(num_prompts):
        prompt: Prompt = workload.next_prompt()
        prompts.append(prompt.messages)
        workload.finished(prompt, None)
    return _TEMPLATE.format(
        filename=filename,
        host=host,
        api=api,
        path=path,
        model=model,
        max_new_tokens=max_new_tokens,
        ignore_eos=ignore_eos and api != "tgi",
        prompts=prompts,
        num_prompts=num_prompts,
        description=workload.describe(),
    )
