"""Turns sampled tokens into text deltas: incremental detokenization and stop strings."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.engine.io import TokenOutput
from kiln.engine.outputs import RequestOutput
from kiln.engine.request import FinishReason, Request
from kiln.text.detokenizer import IncrementalDetokenizer
from kiln.text.stop import StopStringMatcher
from kiln.text.tokenizer import Tokenizer


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher | None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def add_request(self, request: Request) -> None:
        params = request.params
        self._states[request.request_id] = _TextState(
            IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
            ),
            StopStringMatcher(params.stop, keep_stop=params.include_stop_str_in_output)
            if params.stop
            else None,
        )

    def remove_request(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, token_output: TokenOutput) -> RequestOutput:
        """The delta for one new token. A stop string hit sets ``finish_reason`` to
        ``stop_sequence`` on the returned output; the caller ends the request."""
        request = token_output.request
        state = self._states[request.request_id]
        finish_reason = token_output.finish_reason
        text = state.detokenizer.add([token_output.token_id])
        if finish_reason is not None:
            text += state.detokenizer.flush()  # bytes held back for an unfinished character
        if state.stops is not None:
            text, hit = state.stops.feed(text)
            if hit:
                if finish_reason is None and request.params.include_stop_str_in_output:
                    text += state.detokenizer.flush()  # the text is kept: all of it
                finish_reason = FinishReason.STOP_SEQUENCE
            elif finish_reason is not None:
                text += state.stops.flush()
        if finish_reason is not None:
            self.remove_request(request.request_id)
        # NOTE: the sampler computes logprobs for every row of a batch in which any row asked
        # for them; a request that did not ask must not get them depending on its neighbours.
        logprob = token_output.logprob if request.params.wants_logprobs else None
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            token_ids=[token_output.token_id],
            logprobs=[logprob] if logprob is not None else [],
            top_logprobs=[token_output.top_logprobs] if token_output.top_logprobs else [],
            finish_reason=finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
        )
