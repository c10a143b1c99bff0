"""Engine: one step is exactly schedule -> execute -> update, then text (and, on it, the end of
the requests that are done) for each new token."""

from __future__ import annotations

import time

from kiln.config import SchedulerConfig
from kiln.engine.executor import Executor, InProcessExecutor
from kiln.engine.io import TokenOutput
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.metrics import EngineMetrics, EngineStats
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.outputs import RequestOutput
from kiln.engine.request import FinishReason, Request
from kiln.engine.runner import ModelRunner
from kiln.engine.scheduler import Scheduler
from kiln.errors import ContextLengthError
from kiln.sampling import SamplingParams
from kiln.text.tokenizer import Tokenizer


class Engine:
    """Continuous batching over a paged KV cache. Not thread-safe: drive it from one thread
    (``LLM`` does directly, ``AsyncEngine`` from its loop thread)."""

    def __init__(
        self,
        executor: Executor,
        tokenizer: Tokenizer,
        scheduler_config: SchedulerConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        enable_prefix_caching: bool = True,
        exported_sequence_length: int | None = None,
    ) -> None:
        self.executor = executor
        self.exported_sequence_length = exported_sequence_length
        """Set when loaded from an exported artifact: the context it was exported for."""
        self.tokenizer = tokenizer
        self.block_size = executor.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.kv_cache = KVCacheManager(num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache)
        self.output_processor = OutputProcessor(tokenizer)
        self.metrics = EngineMetrics()

    @property
    def runner(self) -> ModelRunner:
        """The in-process executor's runner (tools and tests reach the model's KV cache
        through it); other executors have no runner in this process."""
        if not isinstance(self.executor, InProcessExecutor):
            raise AttributeError(f"{type(self.executor).__name__} runs no runner in this process")
        return self.executor.runner

    @property
    def max_cache_tokens(self) -> int:
        return self.kv_cache.num_blocks * self.block_size

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Reject at admission what could never finish: raises ContextLengthError."""
        if num_prompt_tokens == 0:
            raise ContextLengthError("the prompt is empty: at least one token is needed")
        total = num_prompt_tokens + max_new_tokens
        exported = self.exported_sequence_length
        if exported is not None and num_prompt_tokens >= exported:
            raise ContextLengthError(
                f"input length {num_prompt_tokens} exceeds the exported sequence length "
                f"{exported} (one token must be left to generate)"
            )
        if exported is not None and total > exported:
            raise ContextLengthError(
                f"input length {num_prompt_tokens} + max_new_tokens {max_new_tokens} = {total} "
                f"exceeds the exported sequence length {exported}"
            )
        if total > self.max_model_len:
            raise ContextLengthError(
                f"input ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{total} exceeds the model's context of {self.max_model_len} tokens"
            )
        if total > self.max_cache_tokens:
            raise ContextLengthError(
                f"input ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{total} exceeds the whole KV cache ({self.max_cache_tokens} tokens)"
            )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Request:
        self.check_fits(len(prompt_token_ids), params.max_new_tokens)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        self.scheduler.add_request(request)
        self.output_processor.add_request(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it was not (or no longer) known."""
        request = self.scheduler.finish_request(request_id, FinishReason.ABORT)
        self.output_processor.remove_request(request_id)
        if request is not None:
            self._record_finished(request, time.monotonic())
        return request is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def shutdown(self) -> None:
        """Release the executor (a tensor-parallel one's worker processes); the engine cannot
        step after this."""
        self.executor.shutdown()

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        model_output = self.executor.execute(scheduler_output)
        token_outputs = self.scheduler.update(scheduler_output, model_output)
        now = time.monotonic()
        outputs = [self._process(t, now) for t in token_outputs]
        if scheduler_output.num_batched_tokens:  # not a step that only dropped runner state
            self.metrics.num_steps += 1
            self.metrics.tokens_per_step.observe(scheduler_output.num_batched_tokens)
        return outputs

    def stats(self) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=kv.num_blocks,
            num_kv_blocks_used=kv.num_used_blocks,
            num_kv_blocks_cached=kv.num_cached_blocks,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def _process(self, token_output: TokenOutput, now: float) -> RequestOutput:
        """Text for one new token, and the one place a request ends on its own: the token's
        reason (EOS, stop token id, length) unless the text hit a stop string first."""
        request = token_output.request
        if len(request.output_token_ids) == 1:
            self.metrics.time_to_first_token.observe(now - request.arrival_time)
        output = self.output_processor.process(token_output)
        if output.finish_reason is not None:
            self.scheduler.finish_request(request.request_id, output.finish_reason)
            self._record_finished(request, now)
        return output

    def _record_finished(self, request: Request, now: float) -> None:
        m = self.metrics
        reason = request.finish_reason.value if request.finish_reason else "abort"
        m.num_requests_finished[reason] = m.num_requests_finished.get(reason, 0) + 1
        num_output = len(request.output_token_ids)
        m.num_prompt_tokens += request.num_prompt_tokens
        m.num_generation_tokens += num_output
        m.prompt_tokens.observe(request.num_prompt_tokens)
        m.generation_tokens.observe(num_output)
        m.e2e_latency.observe(now - request.arrival_time)
        if request.scheduled_time is not None:
            m.queue_time.observe(request.scheduled_time - request.arrival_time)
        if request.first_token_time is not None and num_output > 1:
            m.time_per_output_token.observe((now - request.first_token_time) / (num_output - 1))
