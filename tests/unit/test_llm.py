"""LLM end to end on the real stories260K checkpoint: seeds, batching, stops, streaming,
penalties, logprobs, chat history truncation, load errors, dtypes, generation_config."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.errors import ContextLengthError, InvalidRequestError, ModelLoadError
from kiln.kernels.native import cpu_has_native_bf16

SMALL_CACHE = 16 << 20  # stories260K needs 1.25 KiB per token; the 1 GiB default is waste here
PROMPTS = [
    "Once upon a time",
    "Lily",
    "The cat sat on the mat. It was happy",
    "Tom and his mom went to the store. They wanted to buy some apples, but",
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llm(stories_dir: Path) -> LLM:
    # stories260K has no chat template of its own.
    return LLM(
        str(stories_dir),
        dtype="float32",
        device="cpu",
        chat_template="llama-2",
        kv_cache_memory=SMALL_CACHE,
    )


@pytest.fixture(scope="module")
def hf_model(stories_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(stories_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy(llm: LLM) -> Any:
    """The unconstrained greedy 64-token output for PROMPTS[0]."""
    return llm.generate(PROMPTS[0], GREEDY)[0]


def _copy_checkpoint(stories_dir: Path, tmp_path: Path, **config_changes: Any) -> Path:
    path = tmp_path / "stories"
    shutil.copytree(stories_dir, path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | config_changes))
    return path


def _load(path: Path, **kwargs: Any) -> LLM:
    return LLM(str(path), device="cpu", kv_cache_memory=SMALL_CACHE, **kwargs)


def _hf_logits(hf_model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()  # [T, vocab]


# --- seeds and batching -------------------------------------------------------------------


def test_seed_reproduces_and_differs(llm) -> None:
    # The longest prompt fills a KV block, so the repeats also go through the prefix cache.
    prompt = PROMPTS[3]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=32)
    first = llm.generate(prompt, params)[0]
    again = llm.generate(prompt, params)[0]
    other_seed = llm.generate(prompt, params.replace(seed=1235))[0]
    assert len(first.token_ids) == 32
    assert again.token_ids == first.token_ids
    assert again.text == first.text
    assert other_seed.token_ids != first.token_ids
    # Sampling really happened: a seeded run is not just the greedy answer.
    greedy = llm.generate(prompt, GREEDY.replace(max_new_tokens=32))[0]
    assert greedy.token_ids != first.token_ids


def test_seeded_request_is_independent_of_its_batch(llm) -> None:
    seeded = SamplingParams(temperature=1.0, seed=7, max_new_tokens=40)
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=25)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    first, _ = llm.generate([PROMPTS[0], PROMPTS[3]], [seeded, unseeded])
    _, second = llm.generate([PROMPTS[2], PROMPTS[0]], [unseeded, seeded.replace()])
    assert first.token_ids == alone
    assert second.token_ids == alone


def test_batched_generate_equals_each_prompt_alone(llm) -> None:
    lengths = [5, 64, 17, 40]
    params = [GREEDY.replace(max_new_tokens=n) for n in lengths]
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)
    batched = llm.generate(PROMPTS, params)
    for prompt, p, n, out in zip(PROMPTS, params, lengths, batched, strict=True):
        alone = llm.generate(prompt, p)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert len(out.token_ids) == n
        assert out.finish_reason == alone.finish_reason == "length"


def test_small_steps_blocks_and_cache_give_the_same_tokens(stories_dir, llm) -> None:
    """Chunked prefill (16-token steps), 4-token blocks, at most 3 sequences at once and a cache
    too small for all of them (so one is preempted and recomputed) change no token."""
    config = llm.config
    block_size, float32_bytes = 4, 4
    per_token = 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers
    small = LLM(
        str(stories_dir),
        dtype="float32",
        device="cpu",
        kv_cache_memory=25 * block_size * per_token * float32_bytes,  # 25 blocks
        block_size=block_size,
        max_num_batched_tokens=16,
        max_num_seqs=3,
    )
    params = [GREEDY.replace(max_new_tokens=n) for n in (5, 64, 17, 40)]
    params[2] = SamplingParams(temperature=1.0, seed=3, max_new_tokens=17)
    expected = llm.generate(PROMPTS, params)
    outputs = small.generate(PROMPTS, params)
    for out, reference in zip(outputs, expected, strict=True):
        assert out.token_ids == reference.token_ids
        assert out.text == reference.text
    assert small.engine.stats().num_preemptions >= 1


def test_warm_up_changes_no_token(llm) -> None:
    """warm_up=True runs the packed layers at every row bucket before the first request (the
    leak test checks that memory then stays flat); what it computes is thrown away."""
    args = dataclasses.replace(llm.loaded.args, max_num_batched_tokens=64, warm_up=True)
    warmed = LLM.from_args(args)
    params = [GREEDY.replace(max_new_tokens=n) for n in (5, 64, 17, 40)]
    expected = llm.generate(PROMPTS, params)
    for out, reference in zip(warmed.generate(PROMPTS, params), expected, strict=True):
        assert out.token_ids == reference.token_ids


# --- stops --------------------------------------------------------------------------------


def test_stop_string_cuts_exactly(llm, greedy) -> None:
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 7]  # likely spans tokens
    cut = text.index(stop)
    out = llm.generate(PROMPTS[0], GREEDY.replace(stop=[stop]))[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop_sequence"
    assert greedy.token_ids[: len(out.token_ids)] == out.token_ids
    # Generation ended on the token that completed the stop string, not later.
    prompt_ids = llm.tokenizer.encode(PROMPTS[0])
    prompt_text = llm.tokenizer.decode(prompt_ids)

    def output_text(token_ids: list[int]) -> str:
        return llm.tokenizer.decode(prompt_ids + token_ids)[len(prompt_text) :]

    assert stop in output_text(out.token_ids)
    assert stop not in output_text(out.token_ids[:-1])


def test_a_kept_stop_string_stays_with_the_token_that_completes_it(llm, greedy) -> None:
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 7]
    params = GREEDY.replace(stop=[stop], include_stop_str_in_output=True)
    kept = llm.generate(PROMPTS[0], params)[0]
    cut = llm.generate(PROMPTS[0], GREEDY.replace(stop=[stop]))[0]
    assert kept.finish_reason == "stop_sequence"
    assert kept.token_ids == cut.token_ids  # it ends on the same token
    # The whole text of every token made, the stop string included, nothing held back.
    assert kept.text == text[: len(kept.text)]
    assert stop in kept.text and kept.text.startswith(cut.text + stop)


def test_earliest_stop_string_wins(llm, greedy) -> None:
    text = greedy.text
    late, early = text[-12:-6], text[20:26]
    assert text.index(early) < text.index(late)
    out = llm.generate(PROMPTS[0], GREEDY.replace(stop=[late, "never occurs", early]))[0]
    assert out.text == text[: text.index(early)]
    assert out.finish_reason == "stop_sequence"


def test_stop_string_absent_runs_to_length(llm, greedy) -> None:
    out = llm.generate(PROMPTS[0], GREEDY.replace(stop=["zebra", "\n\n\n"]))[0]
    assert out.text == greedy.text
    assert out.token_ids == greedy.token_ids
    assert out.finish_reason == "length"


def test_stop_token_ids(llm, greedy) -> None:
    token = greedy.token_ids[12]
    first = greedy.token_ids.index(token)
    out = llm.generate(PROMPTS[0], GREEDY.replace(stop_token_ids=[token, 511]))[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop_sequence"


def test_max_new_tokens_finishes_with_length(llm, greedy) -> None:
    out = llm.generate(PROMPTS[0], GREEDY.replace(max_new_tokens=9))[0]
    assert out.token_ids == greedy.token_ids[:9]
    assert out.finish_reason == "length"
    assert greedy.finish_reason == "length"  # stories260K never says EOS in 64 tokens


def test_eos_in_config_and_ignore_eos(stories_dir, tmp_path, greedy) -> None:
    eos = greedy.token_ids[20]
    first = greedy.token_ids.index(eos)
    llm = _load(_copy_checkpoint(stories_dir, tmp_path, eos_token_id=eos), dtype="float32")
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "eos_token"
    ignored = llm.generate(PROMPTS[0], GREEDY.replace(ignore_eos=True))[0]
    assert ignored.token_ids == greedy.token_ids
    assert ignored.finish_reason == "length"
    # min_new_tokens blocks EOS until that many tokens exist: the output must differ there.
    blocked = llm.generate(PROMPTS[0], GREEDY.replace(min_new_tokens=first + 1))[0]
    assert blocked.token_ids[first] != eos
    assert blocked.token_ids[:first] == greedy.token_ids[:first]


def test_generation_config_eos_list_counts_as_stops(stories_dir, tmp_path, greedy) -> None:
    eos = greedy.token_ids[25]
    first = greedy.token_ids.index(eos)
    path = _copy_checkpoint(stories_dir, tmp_path)  # config.json keeps eos_token_id 2
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, eos], "max_length": 512})
    )
    out = _load(path, dtype="float32").generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "eos_token"


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [(), ("girl named",)])
def test_stream_deltas_concatenate_to_generate(llm, stop) -> None:
    params = GREEDY.replace(stop=stop)
    expected = llm.generate(PROMPTS[0], params)[0]
    deltas = list(llm.stream(PROMPTS[0], params))
    assert "".join(d.text for d in deltas) == expected.text
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == expected.finish_reason
    assert len(deltas) == len(expected.token_ids)  # one update per token


def test_stream_stopped_early_frees_its_request(llm, greedy) -> None:
    stream = llm.stream(PROMPTS[0], GREEDY)
    first = next(stream)
    stream.close()
    assert first.token_ids == greedy.token_ids[:1]
    assert not llm.engine.has_unfinished()
    assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == greedy.token_ids


# --- penalties ----------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers(llm, hf_model) -> None:
    params = GREEDY.replace(repetition_penalty=1.3, min_new_tokens=64)
    outputs = llm.generate(PROMPTS[:2], params)
    for prompt, out in zip(PROMPTS[:2], outputs, strict=True):
        prompt_ids = llm.tokenizer.encode(prompt)
        with torch.inference_mode():
            reference = hf_model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                do_sample=False,
                repetition_penalty=1.3,
                max_new_tokens=64,
                min_new_tokens=64,
                pad_token_id=0,
            )[0, len(prompt_ids) :].tolist()
        assert out.token_ids == reference
    assert outputs[0].token_ids != llm.generate(PROMPTS[0], GREEDY)[0].token_ids


def test_frequency_and_presence_penalties_match_reference(llm, hf_model) -> None:
    """Each greedy step is the argmax of transformers' logits minus OpenAI's penalties:
    ``frequency * count + presence * (count > 0)`` over the tokens generated so far."""
    frequency, presence = 0.7, 0.4
    out = llm.generate(
        PROMPTS[0],
        GREEDY.replace(max_new_tokens=48, frequency_penalty=frequency, presence_penalty=presence),
    )[0]
    prompt_ids = llm.tokenizer.encode(PROMPTS[0])
    logits = _hf_logits(hf_model, prompt_ids + out.token_ids)[len(prompt_ids) - 1 : -1]
    counts = torch.zeros(logits.shape[-1])
    for step, token in enumerate(out.token_ids):
        penalised = logits[step] - frequency * counts - presence * (counts > 0).float()
        top2 = penalised.topk(2).values
        assert top2[0] - top2[1] > 1e-4, f"near tie at step {step}"
        assert token == penalised.argmax().item(), f"step {step}"
        counts[token] += 1


def test_presence_penalty_repeats_fewer_tokens(llm, greedy) -> None:
    penalised = llm.generate(PROMPTS[0], GREEDY.replace(presence_penalty=2.0))[0]
    assert len(penalised.token_ids) == len(greedy.token_ids)
    assert len(set(penalised.token_ids)) > len(set(greedy.token_ids))
    frequent = llm.generate(PROMPTS[0], GREEDY.replace(frequency_penalty=2.0))[0]
    assert len(set(frequent.token_ids)) > len(set(greedy.token_ids))


# --- logprobs -----------------------------------------------------------------------------


def test_logprobs_match_transformers(llm, hf_model, greedy) -> None:
    params = GREEDY.replace(max_new_tokens=24, logprobs=True, top_logprobs=3)
    out = llm.generate(PROMPTS[0], params)[0]
    assert out.token_ids == greedy.token_ids[:24]  # asking for logprobs changes nothing
    assert len(out.logprobs) == len(out.top_logprobs) == 24
    prompt_ids = llm.tokenizer.encode(PROMPTS[0])
    logits = _hf_logits(hf_model, prompt_ids + out.token_ids)
    expected = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)  # [24, vocab]
    for step, (token, logprob, top) in enumerate(
        zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True)
    ):
        assert abs(logprob - expected[step, token].item()) <= 1e-4
        assert len(top) == 3
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert top[0][0] == token  # greedy: the chosen token is the most likely one
        assert abs(top[0][1] - logprob) <= 1e-6
        reference = expected[step].topk(3)
        assert [t for t, _ in top] == reference.indices.tolist()
        assert values == pytest.approx(reference.values.tolist(), abs=1e-4)


# --- chat ---------------------------------------------------------------------------------


def _conversation(num_exchanges: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You tell short stories about animals."}]
    for i in range(num_exchanges):
        messages.append({"role": "user", "content": f"Tell me story {i} about a dog and a cat."})
        messages.append({"role": "assistant", "content": f"Once upon a time, dog {i} met a cat."})
    messages.append({"role": "user", "content": "And one about a bird?"})
    return messages


def test_chat_truncation_keeps_system_and_drops_oldest_exchanges(llm) -> None:
    messages = _conversation(4)
    full_ids, kept = llm.chat_prompt(messages)
    assert kept == messages
    budget = len(full_ids) - 10  # forces at least one exchange out
    ids, kept = llm.chat_prompt(messages, max_input_tokens=budget)
    assert len(ids) <= budget
    assert kept[0] == messages[0]
    assert kept[-1] == messages[-1]
    dropped = len(messages) - len(kept)
    assert dropped >= 2 and dropped % 2 == 0  # whole user/assistant exchanges
    assert kept[1:] == messages[1 + dropped :]  # the oldest ones
    # One exchange fewer would fit no more: only as much as needed was dropped.
    longer_ids, _ = llm.chat_prompt([messages[0], *messages[dropped - 1 :]])
    assert len(longer_ids) > budget
    answer = llm.chat(
        messages, SamplingParams(temperature=0.0, max_new_tokens=8), max_input_tokens=budget
    )
    assert answer.prompt_token_ids == ids
    assert len(answer.token_ids) == 8


def test_chat_message_over_budget_raises(llm) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "word " * 100},
    ]
    with pytest.raises(ContextLengthError, match="budget is 50 tokens"):
        llm.chat(messages, max_input_tokens=50)


def test_batched_chat(llm) -> None:
    conversations = [_conversation(1), _conversation(2)]
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    answers = llm.chat(conversations, params)
    assert isinstance(answers, list) and len(answers) == 2
    for conversation, answer in zip(conversations, answers, strict=True):
        single = llm.chat(conversation, params)
        assert answer.token_ids == single.token_ids
        assert answer.prompt_token_ids == llm.chat_prompt(conversation)[0]


# --- errors -------------------------------------------------------------------------------


def test_prompt_longer_than_context(stories_dir) -> None:
    llm = LLM(str(stories_dir), device="cpu", max_model_len=64, kv_cache_memory=1 << 20)
    prompt = list(range(3, 103))
    with pytest.raises(ContextLengthError) as error:
        llm.generate(prompt, GREEDY.replace(max_new_tokens=1))
    message = str(error.value)
    assert "100" in message and "64" in message
    assert not llm.engine.has_unfinished()
    # The context is still usable afterwards, up to its last token.
    out = llm.generate(prompt[:60], GREEDY.replace(max_new_tokens=4))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("prompt", ["", [], [[]], ["Lily", ""]])
def test_empty_prompt_is_rejected(llm, prompt) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished()


def test_rejected_prompt_in_a_batch_leaves_nothing_behind(llm, greedy) -> None:
    too_long = [5] * 600  # stories260K's context is 512 tokens
    with pytest.raises(ContextLengthError):
        llm.generate([PROMPTS[1], too_long], GREEDY)
    assert not llm.engine.has_unfinished()
    assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == greedy.token_ids


def test_unsupported_model_type(stories_dir, tmp_path) -> None:
    path = _copy_checkpoint(stories_dir, tmp_path, model_type="mamba")
    with pytest.raises(ModelLoadError, match="'mamba'"):
        _load(path)


def test_config_weights_shape_mismatch(stories_dir, tmp_path) -> None:
    path = _copy_checkpoint(stories_dir, tmp_path, hidden_size=128)
    with pytest.raises(ModelLoadError) as error:
        _load(path)
    message = str(error.value)
    assert "'model.embed_tokens.weight'" in message
    assert "(512, 64)" in message and "(512, 128)" in message
    assert str(path) in message


@pytest.mark.parametrize("num_layers, key", [(4, "model.layers.4."), (6, "model.layers.5.")])
def test_config_weights_layer_count_mismatch(stories_dir, tmp_path, num_layers, key) -> None:
    path = _copy_checkpoint(stories_dir, tmp_path, num_hidden_layers=num_layers)
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        _load(path)


# --- dtypes -------------------------------------------------------------------------------


def test_bfloat16_generates_like_float32(stories_dir, llm) -> None:
    bf16 = _load(stories_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.state_dict().values()} == {torch.bfloat16}
    params = GREEDY.replace(max_new_tokens=16)
    for ours, reference in zip(
        bf16.generate(PROMPTS[:2], params), llm.generate(PROMPTS[:2], params), strict=True
    ):
        assert ours.token_ids == reference.token_ids


def test_float16_on_cpu_falls_back_to_float32(stories_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        fp16 = _load(stories_dir, dtype="float16")
    assert fp16.dtype == torch.float32
    assert {p.dtype for p in fp16.model.state_dict().values()} == {torch.float32}
    assert any(r.levelno == logging.WARNING and "float16" in r.getMessage() for r in caplog.records)


def test_auto_dtype_on_a_cpu_is_bfloat16_only_where_the_cpu_has_it(stories_dir, tmp_path) -> None:
    # On an AVX2-only CPU bfloat16 is emulated: SmolLM2 prefilled 500 tokens at 76 tokens/s in
    # bfloat16 against 460 in float32 (decode ~28 vs ~22), so auto picks float32 there.
    native = cpu_has_native_bf16()
    path = _copy_checkpoint(stories_dir, tmp_path, torch_dtype="bfloat16")
    expected = torch.bfloat16 if native else torch.float32
    assert _load(stories_dir).dtype == expected  # config.json: "torch_dtype": "float32"
    assert _load(path).dtype == expected
    bf16 = _load(path, dtype="bfloat16")  # an explicit dtype wins
    assert bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.state_dict().values()} == {torch.bfloat16}
    assert _load(path, dtype="float32").dtype == torch.float32


def test_unknown_dtype(stories_dir) -> None:
    with pytest.raises(ModelLoadError, match="int7"):
        _load(stories_dir, dtype="int7")


def test_loaded_weights_are_plain_tensors_under_their_checkpoint_names(llm) -> None:
    # Parameters would send every op through __torch_function__ dispatch on the hot path.
    assert list(llm.model.parameters()) == []
    state = llm.model.state_dict()
    assert "model.layers.0.input_layernorm.weight" in state
    assert type(state["model.layers.0.input_layernorm.weight"]) is torch.Tensor
    assert not any("rotary" in name for name in state)  # tables are not weights


def test_generate_takes_a_batch_larger_than_the_servers_queue_bound(llm) -> None:
    # The queue bound (1,024) is back-pressure for online submission, not a batch size limit.
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(1100)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=1))
    assert len(outputs) == 1100
    firsts = {p: o.token_ids for p, o in zip(prompts, outputs, strict=True)}
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == firsts[prompt] and len(out.token_ids) == 1
