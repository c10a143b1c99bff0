"""Tensor parallelism on the CPU: two real worker processes over gloo, against one process.

Tiny random checkpoints (saved as real Hugging Face directories) of Llama with GQA and an MLP
that splits unevenly, Qwen2 (q/k/v bias, tied head) and GPT-J (biased head, parallel block).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.config import ConfigError
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.multiproc_executor import MultiprocExecutor
from kiln.errors import EngineFailureError, KilnError, WorkerFailedError
from server_harness import running_server
from tp_probes import packed_logits

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
VOCAB = 512  # the stories260K tokenizer's
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)
LLAMA_LIKE = dict(SMALL, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    # 97: the MLP splits 49 + 48 over two ranks.
    "llama-gqa": transformers.LlamaConfig(**LLAMA_LIKE, intermediate_size=97),
    "qwen2": transformers.Qwen2Config(**LLAMA_LIKE, intermediate_size=96, tie_word_embeddings=True),
    "gptj": transformers.GPTJConfig(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
OPTIONS = dict(
    dtype="float32",
    device="cpu",
    kv_cache_memory=8 << 20,
    # Small steps: the longest prompt is prefilled in chunks, beside the others' decodes.
    max_num_batched_tokens=24,
)
PROMPT_LENGTHS = (5, 40, 13, 2)


def _save_checkpoint(hf_config: transformers.PretrainedConfig, path: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        # NOTE: wider than the default init so logits are peaked and greedy ties cannot flip.
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.25)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, path / name)
    return path


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left for its parent to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: _save_checkpoint(config, tmp_path_factory.mktemp(name))
        for name, config in CONFIGS.items()
    }


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Iterator[tuple]:
    """The same checkpoint in one process and over two ranks (which also warm their packed
    layers up at start: that must change nothing); the ranks must be gone after shutdown."""
    path = str(checkpoints[request.param])
    single = LLM(path, **OPTIONS)
    parallel = LLM(path, tp=2, warm_up=True, **OPTIONS)
    pids = parallel.engine.executor.pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    yield single, parallel
    parallel.shutdown()
    assert _wait_gone(pids, timeout=0.5) == [], "a rank outlived shutdown()"


def test_batch_matches_one_process(pair: tuple[LLM, LLM]) -> None:
    """A batch of greedy requests (and one seeded sampled one): the same tokens, and the top
    logprobs (logits less their log-sum-exp) within 1e-4."""
    single, parallel = pair
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, min_new_tokens=12, top_logprobs=20)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_new_tokens=12, logprobs=True)
    params = [greedy, greedy, greedy, sampled]
    expected = single.generate(_prompts(), params)
    got = parallel.generate(_prompts(), params)
    for want, have in zip(expected, got, strict=True):
        assert have.token_ids == want.token_ids
        assert len(have.top_logprobs) == len(want.top_logprobs)
        for want_top, have_top in zip(want.top_logprobs, have.top_logprobs, strict=True):
            assert [t for t, _ in have_top] == [t for t, _ in want_top]
            assert (
                max(abs(a - b) for (_, a), (_, b) in zip(have_top, want_top, strict=True)) <= 1e-4
            )


def test_logits_match_one_process(pair: tuple[LLM, LLM]) -> None:
    """Every position's logits of two sequences, on every rank, within 1e-4 of one process;
    each rank holds half the KV heads and half the vocabulary."""
    single, parallel = pair
    prompts = _prompts()[:2]
    expected = packed_logits(single.engine.runner, prompts)
    executor = parallel.engine.executor
    assert isinstance(executor, MultiprocExecutor)
    ranks = executor.collective_rpc(packed_logits, prompts)
    for rank in ranks:
        assert rank["logits"].shape == expected["logits"].shape
        assert (rank["logits"] - expected["logits"]).abs().max().item() <= 1e-4
        kv_heads, head_dim = expected["kv_cache_shape"][2:]
        assert rank["kv_cache_shape"][2:] == (kv_heads // 2, head_dim)
        assert rank["embedding_rows"] == VOCAB // 2


def test_degree_that_does_not_divide_lists_the_valid_ones(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"tp=3 .*4 attention heads, 2 KV heads .*: 1, 2$"):
        LLM(str(checkpoints["llama-gqa"]), tp=3, **OPTIONS)
    with pytest.raises(ConfigError, match="int8 does not combine with tp=2"):
        LLM(str(checkpoints["llama-gqa"]), tp=2, quantize="int8", **OPTIONS)


def test_killed_rank_fails_requests_then_refuses(checkpoints: dict[str, Path]) -> None:
    """A rank killed mid-generation: the requests served over HTTP, running or queued (two run
    at once), get an error, not a hang; so does every later one; the other rank is stopped."""
    llm = LLM(str(checkpoints["llama-gqa"]), tp=2, **{**OPTIONS, "max_num_seqs": 2})
    pids = llm.engine.executor.pids
    with running_server(llm) as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}

        async def stream_then_kill() -> tuple[str, list[int]]:
            async with httpx.AsyncClient(timeout=30) as client:
                blocking = [
                    asyncio.create_task(client.post(url + "/v1/completions", json=body))
                    for _ in range(3)
                ]
                text = ""
                async with client.stream(
                    "POST", url + "/v1/completions", json={**body, "stream": True}
                ) as response:
                    async for line in response.aiter_lines():
                        if not text:
                            os.kill(pids[1], signal.SIGKILL)  # the first token is out
                        text += line + "\n"
                return text, [(await b).status_code for b in blocking]

        start = time.monotonic()
        stream_text, statuses = asyncio.run(stream_then_kill())
        assert time.monotonic() - start < 20
        assert all(status >= 500 for status in statuses), statuses
        assert "rank 1 died" in stream_text and "signal 9" in stream_text
        assert '"finish_reason":"length"' not in stream_text.replace(" ", "")
        later = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert later.status_code >= 500 and "has failed" in later.text
    assert _wait_gone(pids) == []
    with pytest.raises(WorkerFailedError, match="rank 1 died"):
        llm.generate("Once upon a time", SamplingParams(max_new_tokens=4))
    llm.shutdown()


@pytest.mark.slow
def test_killed_rank_answers_every_pending_request(checkpoints: dict[str, Path]) -> None:
    """Through the async engine: every request in flight or queued gets an error."""
    llm = LLM(str(checkpoints["gptj"]), tp=2, max_num_seqs=2, **OPTIONS)
    engine = AsyncEngine(llm.engine)
    engine.start()
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)

    async def run() -> list[BaseException | None]:
        async def one(i: int) -> BaseException | None:
            num_outputs = 0
            try:
                async for _ in engine.generate([5 + i, 6, 7], params):
                    num_outputs += 1
                    if i == 0 and num_outputs == 3:
                        os.kill(llm.engine.executor.pids[0], signal.SIGKILL)
            except KilnError as e:
                return e
            return None

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 20)

    errors = asyncio.run(run())
    engine.stop()
    assert all(isinstance(e, EngineFailureError) for e in errors), errors
    llm.shutdown()


@pytest.mark.slow
def test_workers_exit_when_the_parent_is_killed(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    script = (
        "import json, sys, time\n"
        "from kiln import LLM\n"
        f"llm = LLM({str(checkpoints['qwen2'])!r}, tp=2, **{OPTIONS!r})\n"
        "print(json.dumps(llm.engine.executor.pids), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
        assert all(_alive(p) for p in pids)
        parent.kill()
        parent.wait()
        assert _wait_gone(pids, timeout=10) == []
    finally:
        parent.kill()


@pytest.mark.slow
def test_cli_generate_with_tp(checkpoints: dict[str, Path]) -> None:
    path = str(checkpoints["llama-gqa"])
    common = ["--model", path, "--dtype", "float32", "--prompt", "Once upon a time"]
    common += ["--max-new-tokens", "8"]
    outputs = [
        subprocess.run(
            [sys.executable, "-m", "kiln.cli.main", "generate", *common, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        for extra in ([], ["--tp", "2"])
    ]
    assert outputs[0] == outputs[1] and outputs[0].strip()


@pytest.mark.slow
def test_gguf_over_three_ranks(smollm2_gguf: Path) -> None:
    """SmolLM2's Q4_1 GGUF (9 heads, 3 KV heads, tied head), dequantized: each rank slices the
    whole tensors it reads (llama.cpp's q/k row order undone first), same tokens as one process."""
    options = dict(dtype="float32", device="cpu", kv_cache_memory=64 << 20, quantize="none")
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    with LLM(str(smollm2_gguf), **options) as single:
        expected = [out.token_ids for out in single.generate(prompts, params)]
    with LLM(str(smollm2_gguf), tp=3, **options) as parallel:
        assert [out.token_ids for out in parallel.generate(prompts, params)] == expected
