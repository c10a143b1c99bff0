"""Sampler: processors agree with transformers, seeds reproduce, draws follow the distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.utils import GenerationMixin

from kiln.sampling import PenaltyState, Sampler, SamplingParams, SamplingRow, make_generator
from kiln.sampling import processors as P
from kiln.sampling.penalties import NEUTRAL_SLOT

VOCAB = 64
EOS = 2
_NO_IDS = torch.zeros(1, 1, dtype=torch.long)  # warpers ignore input_ids


def random_logits(num_rows: int, seed: int = 0, inf_fraction: float = 0.1) -> torch.Tensor:
    """``[num_rows, VOCAB]`` logits with a spread like a model's and some -inf entries."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, VOCAB, generator=g) * 3.0
    masked = torch.rand(num_rows, VOCAB, generator=g) < inf_fraction
    masked[:, 0] = False  # at least one finite logit per row
    return logits.masked_fill(masked, -math.inf)


def sampled(**kwargs: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs))  # type: ignore[arg-type]


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # Same tokens filtered, and the surviving values equal (inf positions must match exactly).
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


# --- each processor against transformers, with different parameters per row in one call ---


def test_temperature_matches_transformers() -> None:
    temps = [0.3, 1.0, 1.7, 0.05, 5.0]
    logits = random_logits(len(temps))
    ours = Sampler().process_logits(logits, [sampled(temperature=t) for t in temps])
    for i, t in enumerate(temps):
        ref = TemperatureLogitsWarper(t)(_NO_IDS, logits[i : i + 1])
        assert_same_logits(ours[i : i + 1], ref)


def test_top_k_matches_transformers() -> None:
    ks = [1, 3, 10, 0, VOCAB - 1, VOCAB + 5]  # 0 disables; > V keeps everything
    logits = random_logits(len(ks), seed=1, inf_fraction=0.3)
    logits[2, :] = -math.inf  # fewer finite logits than k: nothing more is removed
    logits[2, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    logits[1, 5:9] = 50.0  # 4 tokens tie for the top: k=3 keeps all of them, as transformers
    ours = Sampler().process_logits(logits, [sampled(top_k=k) for k in ks])
    for i, k in enumerate(ks):
        row = logits[i : i + 1]
        ref = TopKLogitsWarper(top_k=k)(_NO_IDS, row) if k else row
        assert_same_logits(ours[i : i + 1], ref)
    assert torch.isfinite(ours[0]).sum() == 1
    assert torch.isfinite(ours[1]).sum() == 4


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["top_k", "top_k_top_p"])
def test_a_top_k_beyond_int64_keeps_everything(top_p: float) -> None:
    # An HTTP API accepts any integer: it must not overflow the whole batch's step.
    logits = random_logits(1, seed=5).repeat(2, 1)
    rows = [sampled(top_k=10**30, top_p=top_p), sampled(top_k=0, top_p=top_p)]
    ours = Sampler().process_logits(logits, rows)
    assert_same_logits(ours[0:1], ours[1:2])


def test_top_p_matches_transformers() -> None:
    # 1e-9: 1 - top_p rounds to 1.0 in float32, so only min_tokens_to_keep saves the top token
    ps = [1e-4, 0.3, 0.5, 0.9, 0.999, 1.0, 1e-9]
    logits = random_logits(len(ps), seed=2)
    logits[5, 10] = 200.0  # row 5 has underflowing probabilities; top_p=1 must not drop them
    ours = Sampler().process_logits(logits, [sampled(top_p=p) for p in ps])
    for i, p in enumerate(ps):
        row = logits[i : i + 1]
        ref = TopPLogitsWarper(top_p=p)(_NO_IDS, row) if p < 1.0 else row
        assert_same_logits(ours[i : i + 1], ref)
    # A tiny top_p keeps only the most likely token.
    assert torch.isfinite(ours[0]).sum() == 1 and torch.isfinite(ours[6]).sum() == 1


def test_top_p_threshold_rounds_like_transformers() -> None:
    # p(token 0) lies between float32(1 - 0.9) and 1 - float32(0.9): transformers computes the
    # threshold in float64 and keeps token 0; a float32 `1 - top_p` would drop it.
    logits = torch.tensor([[0.0, 2.1972243785858154]])
    assert (
        float(torch.tensor(1 - 0.9))
        < float(logits.softmax(-1)[0, 0])
        <= float(1 - torch.tensor(0.9))
    )
    ours = Sampler().process_logits(logits, [sampled(top_p=0.9)])
    assert_same_logits(ours, TopPLogitsWarper(top_p=0.9)(_NO_IDS, logits))
    assert torch.isfinite(ours).all()


def test_top_k_then_top_p_share_one_sort_and_match_transformers() -> None:
    params = [(5, 0.8), (0, 0.6), (20, 1.0), (2, 0.99), (40, 0.4)]
    logits = random_logits(len(params), seed=3)
    rows = [sampled(top_k=k, top_p=p) for k, p in params]
    ours = Sampler().process_logits(logits, rows)
    for i, (k, p) in enumerate(params):
        ref = logits[i : i + 1]
        if k:
            ref = TopKLogitsWarper(top_k=k)(_NO_IDS, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(top_p=p)(_NO_IDS, ref)
        assert_same_logits(ours[i : i + 1], ref)


def test_min_p_matches_transformers() -> None:
    min_ps = [0.0, 0.01, 0.1, 0.5, 0.95]
    logits = random_logits(len(min_ps), seed=4)
    ours = Sampler().process_logits(logits, [sampled(min_p=m) for m in min_ps])
    for i, m in enumerate(min_ps):
        ref = MinPLogitsWarper(min_p=m)(_NO_IDS, logits[i : i + 1])
        assert_same_logits(ours[i : i + 1], ref)
    assert torch.equal(ours[0], logits[0])  # min_p=0 changes nothing


def test_typical_p_matches_transformers() -> None:
    masses = [0.2, 1.0, 0.5, 0.95, 1.0, 0.01]
    logits = random_logits(len(masses), seed=5)
    ours = Sampler().process_logits(logits, [sampled(typical_p=m) for m in masses])
    for i, m in enumerate(masses):
        row = logits[i : i + 1]
        ref = TypicalLogitsWarper(mass=m)(_NO_IDS, row) if m < 1.0 else row
        assert_same_logits(ours[i : i + 1], ref)


def test_min_p_runs_before_typical_p_as_in_transformers() -> None:
    logits = random_logits(1, seed=1, inf_fraction=0.0)
    min_p, typical = MinPLogitsWarper(min_p=0.3), TypicalLogitsWarper(mass=0.5)
    ref = typical(_NO_IDS, min_p(_NO_IDS, logits))
    swapped = min_p(_NO_IDS, typical(_NO_IDS, logits))
    assert not torch.equal(ref.isinf(), swapped.isinf())  # the order matters for this row
    ours = Sampler().process_logits(logits, [sampled(min_p=0.3, typical_p=0.5)])
    assert_same_logits(ours, ref)


def test_repetition_penalty_matches_transformers() -> None:
    cases = [  # (penalty, prompt ids, output ids), duplicates included
        (1.3, [1, 5, 5, 9], [9, 12]),
        (1.0, [1, 5], [3]),
        (0.7, [4, 4, 4], []),
        (3.0, [], [0, 63, 7, 7]),
    ]
    logits = random_logits(len(cases), seed=6)
    rows = [
        SamplingRow(SamplingParams.greedy_params(repetition_penalty=r), prompt, output)
        for r, prompt, output in cases
    ]
    ours = Sampler().process_logits(logits, rows)
    for i, (r, prompt, output) in enumerate(cases):
        ids = torch.tensor([[*prompt, *output]])
        row = logits[i : i + 1]
        ref = RepetitionPenaltyLogitsProcessor(penalty=r)(ids, row.clone()) if r != 1.0 else row
        assert_same_logits(ours[i : i + 1], ref)


def _transformers_processors(params: SamplingParams, prompt_len: int) -> list:
    """The processor list transformers' generate() builds for ``params``, in its own order."""
    greedy = params.greedy
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=1.0 if greedy else params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        typical_p=params.typical_p,
        min_p=params.min_p or None,
        repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_new_tokens,
    )
    config._eos_token_tensor = torch.tensor([EOS])

    class _Generator(GenerationMixin):
        pass

    return _Generator()._get_logits_processor(config, input_ids_seq_length=prompt_len, device="cpu")


def test_whole_pipeline_matches_transformers_generate_processors() -> None:
    cases = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
        SamplingParams(temperature=1.3, typical_p=0.7, min_new_tokens=5, repetition_penalty=0.9),
        SamplingParams.greedy_params(repetition_penalty=1.5, min_new_tokens=4, top_k=2),
        SamplingParams(temperature=0.5, top_p=0.5, typical_p=0.9, min_p=0.2),
        SamplingParams(),
    ]
    prompts = [[3, 4, 5], [EOS, 8], [10, 11, 10], [1], [6, 6]]
    outputs = [[7, 7], [9], [12], [], [1, 2, 3]]
    logits = random_logits(len(cases), seed=7)
    logits[:, EOS] = 9.0  # EOS likely, so blocking it matters
    rows = [SamplingRow(p, a, b) for p, a, b in zip(cases, prompts, outputs, strict=True)]
    ours = Sampler(eos_token_ids=[EOS]).process_logits(logits, rows)
    for i, params in enumerate(cases):
        input_ids = torch.tensor([[*prompts[i], *outputs[i]]])
        ref = logits[i : i + 1].clone()
        for processor in _transformers_processors(params, len(prompts[i])):
            ref = processor(input_ids, ref)
        assert_same_logits(ours[i : i + 1], ref)
    # The greedy row picks transformers' greedy token.
    assert Sampler([EOS])(logits, rows).token_ids[2] == int(ours[2].argmax())


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    logits = random_logits(3, seed=8, inf_fraction=0.0)
    rows = [
        SamplingRow(SamplingParams.greedy_params(frequency_penalty=0.5), [4, 4], [1, 1, 1, 2]),
        SamplingRow(SamplingParams.greedy_params(presence_penalty=-1.5), [4], [1, 1, 3]),
        SamplingRow(
            SamplingParams.greedy_params(frequency_penalty=2.0, presence_penalty=1.0), [], [5, 5]
        ),
    ]
    ours = Sampler().process_logits(logits, rows)
    expected = logits.clone()
    expected[0, 1] -= 1.5
    expected[0, 2] -= 0.5
    expected[1, 1] += 1.5
    expected[1, 3] += 1.5
    expected[2, 5] -= 2.0 * 2 + 1.0
    torch.testing.assert_close(ours, expected)  # prompt token 4 is never penalised


# --- sampling behaviour ---


def test_greedy_is_argmax_and_fast_path_skips_processing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logits = random_logits(8, seed=9)
    before = logits.clone()

    def fail(*args: object) -> None:
        raise AssertionError("a plain greedy batch must be a bare argmax")

    monkeypatch.setattr(Sampler, "_penalize", fail)
    # Warper settings are irrelevant to greedy rows and keep them on the fast path.
    rows = [SamplingRow(SamplingParams.greedy_params(top_k=3, seed=i)) for i in range(8)]
    out = Sampler([EOS])(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None
    assert out.top_logprobs == [[]] * 8
    assert torch.equal(logits, before)


def test_sampling_does_not_modify_the_callers_logits() -> None:
    logits = random_logits(3, seed=10)
    before = logits.clone()
    rows = [
        SamplingRow(SamplingParams(temperature=0.5, top_k=4, repetition_penalty=2.0), [1], [2]),
        SamplingRow(SamplingParams.greedy_params(min_new_tokens=3), [], []),
        SamplingRow(SamplingParams(typical_p=0.5, min_p=0.1)),
    ]
    Sampler([EOS])(logits, rows)
    assert torch.equal(logits, before)


def _run_steps(rows_factory, num_steps: int = 30, seed: int = 11) -> list[list[int]]:
    """Sample ``num_steps`` tokens for a batch; returns the token ids per step."""
    sampler = Sampler()
    rows = rows_factory()
    steps = []
    for step in range(num_steps):
        logits = random_logits(len(rows), seed=seed + step, inf_fraction=0.0)
        steps.append(sampler(logits, rows).token_ids)
    return steps


def _seeded(seed: int, **kwargs: object) -> SamplingRow:
    return SamplingRow(SamplingParams(seed=seed, **kwargs), generator=make_generator(seed))  # type: ignore[arg-type]


def test_same_seed_reproduces_and_different_seeds_differ() -> None:
    first = _run_steps(lambda: [_seeded(123, top_p=0.95)])
    again = _run_steps(lambda: [_seeded(123, top_p=0.95)])
    other = _run_steps(lambda: [_seeded(124, top_p=0.95)])
    assert first == again
    assert first != other


def test_seeded_row_is_independent_of_batch_composition() -> None:
    # Give row "A" (seed 5) the same logits at every step whatever else is in the batch.
    sampler = Sampler()
    alone = [_seeded(5, temperature=1.2)]
    crowd = [
        sampled(temperature=0.8),  # unseeded: draws from the global RNG
        SamplingRow(SamplingParams.greedy_params()),
        _seeded(5, temperature=1.2),
        _seeded(99, top_k=10, typical_p=0.5),
    ]
    tokens_alone, tokens_crowd = [], []
    for step in range(40):
        logits = random_logits(4, seed=100 + step, inf_fraction=0.0)
        tokens_alone.append(sampler(logits[2:3], alone).token_ids[0])
        tokens_crowd.append(sampler(logits, crowd).token_ids[2])
    assert tokens_alone == tokens_crowd
    assert len(set(tokens_alone)) > 5  # really sampling, not stuck on one token


def test_unseeded_rows_follow_the_global_rng() -> None:
    rows_factory = lambda: [sampled(), sampled(temperature=2.0)]  # noqa: E731
    torch.manual_seed(0)
    first = _run_steps(rows_factory)
    torch.manual_seed(0)
    assert _run_steps(rows_factory) == first


def test_top_k_1_and_tiny_top_p_are_deterministic() -> None:
    logits = random_logits(1, seed=12).expand(200, VOCAB)
    argmax = int(logits[0].argmax())
    rows = [sampled(temperature=2.0, top_k=1)] * 100 + [sampled(temperature=2.0, top_p=1e-6)] * 100
    assert set(Sampler()(logits, rows).token_ids) == {argmax}


def test_min_p_never_samples_below_its_threshold() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    # min_p=0.4 keeps tokens with p >= 0.4 * 0.5 = 0.2: only tokens 0 and 1.
    counts = torch.bincount(
        torch.tensor(Sampler()(logits, [sampled(min_p=0.4)] * 4000).token_ids), minlength=4
    )
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0] > 0 and counts[1] > 0


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draw_frequencies_match_probabilities(temperature: float) -> None:
    probs = torch.tensor([0.2, 0.3, 0.5])
    num_draws = 20_000
    torch.manual_seed(1234)
    logits = probs.log().expand(num_draws, 3)
    rows = [sampled(temperature=temperature)] * num_draws
    counts = torch.bincount(torch.tensor(Sampler()(logits, rows).token_ids), minlength=3)
    target = probs ** (1 / temperature)
    target = target / target.sum()
    # 2 degrees of freedom: P(chi2 > 20) is about 5e-5, while a wrong distribution (say, the
    # un-tempered one at T=0.5) scores in the hundreds.
    assert _chi_square(counts.double(), target.double()) < 20.0


def test_seeded_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.2, 0.3, 0.5])
    logits = probs.log().unsqueeze(0)
    sampler, row = Sampler(), _seeded(7)
    tokens = [sampler(logits, [row]).token_ids[0] for _ in range(3000)]
    counts = torch.bincount(torch.tensor(tokens), minlength=3)
    assert _chi_square(counts.double(), probs.double()) < 20.0


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = random_logits(4, seed=13)
    rows = [
        SamplingRow(
            SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=True),
            [1, 2],
            [3],
        ),
        sampled(top_logprobs=5),
        SamplingRow(SamplingParams.greedy_params(frequency_penalty=1.0)),  # asked for nothing
        SamplingRow(SamplingParams.greedy_params(logprobs=True, top_logprobs=20)),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and len(out.logprobs) == 4
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(float(raw[i, token]), abs=1e-6)
    assert out.top_logprobs[0] == [] and out.top_logprobs[2] == []
    for i, n in ((1, 5), (3, 20)):
        top = out.top_logprobs[i]
        assert len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in top] == raw[i].topk(n).indices.tolist()
        for token, value in top:
            assert value == pytest.approx(float(raw[i, token]), abs=1e-6)
    assert out.top_logprobs[3][0][0] == out.token_ids[3]  # greedy takes the top alternative


def test_logprobs_none_when_no_row_asks() -> None:
    out = Sampler()(random_logits(2), [sampled(), SamplingRow(SamplingParams.greedy_params())])
    assert out.logprobs is None
    assert out.top_logprobs == [[], []]


def test_min_new_tokens_blocks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 50.0  # EOS first, stop token 7 second, token 9 third
    logits[0, 7] = 40.0
    logits[0, 9] = 30.0
    sampler = Sampler(eos_token_ids=[EOS])
    greedy = SamplingParams.greedy_params(min_new_tokens=3, stop_token_ids=[7])
    assert sampler(logits, [SamplingRow(greedy, [1], [4, 5])]).token_ids == [9]
    assert sampler(logits, [SamplingRow(greedy, [1], [4, 5, 6])]).token_ids == [EOS]
    # With ignore_eos, EOS does not end the request, so it is not blocked (stop ids still are).
    ignoring = greedy.replace(ignore_eos=True)
    assert sampler(logits, [SamplingRow(ignoring, [1], [])]).token_ids == [EOS]
    logits[0, EOS] = 0.0
    assert sampler(logits, [SamplingRow(ignoring, [1], [])]).token_ids == [9]
    # A sampled row never draws a blocked token either.
    rows = [SamplingRow(SamplingParams(min_new_tokens=2, stop_token_ids=[7]), [], [1])] * 500
    tokens = set(sampler(logits.expand(500, VOCAB), rows).token_ids)
    assert 7 not in tokens and EOS not in tokens


def test_row_count_must_match_logits() -> None:
    with pytest.raises(ValueError, match="2 sampling rows for 3"):
        Sampler()(random_logits(3), [sampled(), sampled()])


def test_processors_leave_neutral_rows_exactly_unchanged() -> None:
    logits = random_logits(2, seed=14)
    logits[:, 3] = 150.0  # other probabilities underflow to 0 in float32
    ones = torch.ones(2, 1)
    zeros = torch.zeros(2, 1)
    assert torch.equal(P.apply_temperature(logits, ones), logits)
    assert torch.equal(P.apply_min_p(logits, zeros), logits)
    assert torch.equal(
        P.apply_frequency_presence_penalties(logits, torch.ones_like(logits), zeros, zeros),
        logits,
    )
    seen = torch.ones_like(logits, dtype=torch.bool)
    assert torch.equal(P.apply_repetition_penalty(logits, seen, ones), logits)
    unchanged = P.apply_top_k_top_p(
        logits, torch.tensor([0, 0]), torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    assert torch.equal(unchanged, logits)


# --- incremental penalty statistics (what the engine's runner keeps per request) ---


def test_penalty_state_is_bit_identical_to_counting_the_tokens_every_step() -> None:
    """Rows whose statistics live in a PenaltyState, updated one token per step, give exactly
    the logits and tokens of rows recounted from their whole token lists, through slot reuse
    and growth, and with rows that use no penalty (the neutral slot) mixed in."""
    cases = [
        SamplingParams.greedy_params(repetition_penalty=1.3),
        SamplingParams(seed=1, frequency_penalty=0.5, presence_penalty=0.3, top_k=20),
        SamplingParams(seed=2, repetition_penalty=0.8, frequency_penalty=-0.4, min_new_tokens=5),
        SamplingParams.greedy_params(),
        SamplingParams.greedy_params(min_new_tokens=3, stop_token_ids=[7]),
        SamplingParams(seed=3, top_p=0.8, presence_penalty=1.5),
    ]
    g = torch.Generator().manual_seed(0)
    state = PenaltyState(VOCAB)
    sampler = Sampler([EOS])

    def new_request(params: SamplingParams) -> dict:
        prompt = torch.randint(
            0, VOCAB, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g
        )
        prompt_ids = prompt.tolist()
        return {
            "params": params,
            "prompt": prompt_ids,
            "output": [],
            "slot": state.add(params, prompt_ids, []),
            "generators": (make_generator(params.seed), make_generator(params.seed)),
        }

    requests = [new_request(p) for p in cases]
    assert [r["slot"] == NEUTRAL_SLOT for r in requests] == [False, False, False, True, True, False]
    for step in range(60):
        if step in (20, 40):  # one request ends, another takes its slot (zeroed on release)
            state.release(requests[0]["slot"])
            requests[0] = new_request(cases[(step // 20) % len(cases)])
        logits = random_logits(len(requests), seed=300 + step)
        logits[:, EOS] = 5.0  # likely, so min_new_tokens blocking matters
        counted = [
            SamplingRow(r["params"], r["prompt"], r["output"], r["generators"][0]) for r in requests
        ]
        kept = [
            SamplingRow(r["params"], r["prompt"], r["output"], r["generators"][1], r["slot"])
            for r in requests
        ]
        assert torch.equal(
            sampler.process_logits(logits, counted), sampler.process_logits(logits, kept, state)
        )
        tokens = sampler(logits, counted).token_ids
        assert sampler(logits, kept, state).token_ids == tokens
        for r, token in zip(requests, tokens, strict=True):
            r["output"].append(token)
        state.append([r["slot"] for r in requests], tokens)
    assert state.num_used_slots == 4 and state.num_slots == 8  # grew 1 -> 2 -> 4 -> 8
    # Slot-free rows are refused rather than silently unpenalised.
    with pytest.raises(ValueError, match="penalty_slot"):
        sampler(random_logits(1), [SamplingRow(cases[0])], state)


def test_penalty_state_add_counts_prompt_and_output_like_the_processors() -> None:
    state = PenaltyState(VOCAB)
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.1)
    prompt, output = [3, 3, 9], [9, 4, 4, 4]
    slot = state.add(params, prompt, output)
    assert torch.equal(state.seen_rows([slot]), P.token_mask([prompt + output], VOCAB, "cpu"))
    assert torch.equal(state.count_rows([slot]), P.token_counts([output], VOCAB, "cpu"))
    assert not state.seen_rows([NEUTRAL_SLOT]).any() and not state.count_rows([0]).any()
    state.release(slot)
    assert state.num_used_slots == 0 and not state.seen.any() and not state.counts.any()
