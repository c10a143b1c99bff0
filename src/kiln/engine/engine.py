"""Engine: admits requests, runs steps, streams per-request outputs.

NOTE: this first engine reserves each request's whole KV budget (prompt + max_new_tokens) when
it is admitted and runs whole prefills; the token-budget scheduler with chunked prefill,
preemption and prefix caching replaces that policy without changing this interface.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.engine.block_pool import BlockPool
from kiln.engine.outputs import RequestOutput
from kiln.engine.runner import ModelRunner
from kiln.engine.sequence import FinishReason, Sequence
from kiln.errors import ContextLengthError
from kiln.sampling import SamplingParams, make_generator
from kiln.text.detokenizer import IncrementalDetokenizer
from kiln.text.stop import StopStringMatcher
from kiln.text.tokenizer import Tokenizer


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher | None


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        config: ModelConfig,
        tokenizer: Tokenizer,
        num_blocks: int,
        max_model_len: int,
        max_num_seqs: int = 64,
    ) -> None:
        self.runner = runner
        self.config = config
        self.tokenizer = tokenizer
        self.block_size = runner.block_size
        self.block_pool = BlockPool(num_blocks)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = runner.eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._text: dict[str, _TextState] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if not prompt_token_ids:
            raise ContextLengthError("the prompt is empty: at least one token is needed")
        num_prompt = len(prompt_token_ids)
        if num_prompt >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {num_prompt} tokens; the model's context is {self.max_model_len} "
                f"tokens, so at most {self.max_model_len - 1} fit with room to generate"
            )
        total = min(num_prompt + params.max_new_tokens, self.max_model_len)
        if self._blocks_for(total) > self.block_pool.num_blocks:
            raise ContextLengthError(
                f"prompt ({num_prompt}) + max_new_tokens ({params.max_new_tokens}) needs "
                f"{self._blocks_for(total) * self.block_size} KV cache slots; the cache has "
                f"{self.block_pool.num_blocks * self.block_size}"
            )
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_total_tokens=self.max_model_len,
            generator=make_generator(params.seed),
        )
        self._text[request_id] = _TextState(
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
            StopStringMatcher(params.stop) if params.stop else None,
        )
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq)

    def step(self) -> list[RequestOutput]:
        self._admit()
        if not self.running:
            return []
        batch = [(seq, seq.num_tokens - seq.num_computed_tokens) for seq in self.running]
        sampled, sampler_output = self.runner.execute(batch)
        outputs: list[RequestOutput] = []
        if sampler_output is None:
            return outputs
        for i, seq in enumerate(sampled):
            token_id = sampler_output.token_ids[i]
            seq.append_token(token_id)
            out = RequestOutput(request_id=seq.request_id, text="", token_ids=[token_id])
            if sampler_output.logprobs is not None:
                out.logprobs = [sampler_output.logprobs[i]]
            if sampler_output.top_logprobs and sampler_output.top_logprobs[i]:
                out.top_logprobs = [sampler_output.top_logprobs[i]]
            out.text = self._detokenize(seq, token_id)
            out.finish_reason = seq.finish_reason
            out.num_prompt_tokens = len(seq.prompt_token_ids)
            out.num_output_tokens = len(seq.output_token_ids)
            outputs.append(out)
        for seq in [s for s in self.running if s.is_finished]:
            self.running.remove(seq)
            self._release(seq)
        return outputs

    def _detokenize(self, seq: Sequence, token_id: int) -> str:
        state = self._text[seq.request_id]
        delta = state.detokenizer.add([token_id])
        if seq.is_finished:
            delta += state.detokenizer.flush()  # bytes held back for an unfinished character
        if state.stops is None:
            return delta
        text, hit = state.stops.feed(delta)
        if hit:
            seq.finish_reason = FinishReason.STOP_SEQUENCE
        elif seq.is_finished:
            text += state.stops.flush()
        return text

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            total = min(len(seq.prompt_token_ids) + seq.params.max_new_tokens, self.max_model_len)
            needed = self._blocks_for(total)
            if needed > self.block_pool.num_free_blocks:
                break  # FCFS: later requests wait behind this one
            seq.block_table = self.block_pool.allocate(needed)
            self.waiting.popleft()
            self.running.append(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = FinishReason.ABORT
        self.block_pool.free(seq.block_table)
        seq.block_table = []
        self._text.pop(seq.request_id, None)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
