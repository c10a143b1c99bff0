"""Packing without cross-sample attention: a packed sample's logits equal those it gets alone,
through the training forward (no cache) and through the inference forward (paged KV cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.models.layers.attention import AttentionMetadata
from kiln.train.data import Example, Record, dolly_prompt, split, tokenize_dolly
from kiln.train.loss import packed_logits
from kiln.train.model_io import TrainableModel, load_for_training
from kiln.train.packing import IGNORE_INDEX, collate, pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(stories_dir: Path) -> TrainableModel:
    return load_for_training(str(stories_dir))


def _examples(tiny: TrainableModel) -> list[Example]:
    records = [
        Record("Name a colour.", "Red."),
        Record("Who sat on the mat?", "The cat sat on the mat.", "A cat sat on a mat."),
        Record("Count to three.", "One, two, three."),
    ]
    return [tokenize_dolly(r, tiny.tokenizer) for r in records]


def _alone_with_cache(tiny: TrainableModel, token_ids: list[int]) -> torch.Tensor:
    """The sample through the serving path: one prefill over a paged KV cache."""
    model, config = tiny.model, tiny.config
    n, block = len(token_ids), 16
    num_blocks = -(-n // block)
    caches = [
        torch.zeros(2, num_blocks * block, config.num_key_value_heads, config.head_dim)
        for _ in range(config.num_hidden_layers)
    ]
    meta = AttentionMetadata.build([0], [n], [list(range(num_blocks))], block)
    with torch.no_grad():
        hidden = model.forward(torch.tensor(token_ids), torch.arange(n), caches, meta)
        return model.compute_logits(hidden)


def test_dolly_prompt_sections_and_loss_mask(tiny: TrainableModel) -> None:
    assert dolly_prompt("Q?") == "### Instruction\nQ?\n\n### Answer\n"
    assert dolly_prompt("Q?", "Some text.") == (
        "### Instruction\nQ?\n\n### Context\nSome text.\n\n### Answer\n"
    )
    example = tokenize_dolly(Record("Q?", "An answer."), tiny.tokenizer)
    prompt_len = len(tiny.tokenizer.encode(dolly_prompt("Q?")))
    assert example.loss_mask == [False] * prompt_len + [True] * (len(example) - prompt_len)
    assert example.token_ids[-1] == tiny.tokenizer.eos_token_id
    assert tiny.tokenizer.decode(example.token_ids[prompt_len:]) == "An answer."


def test_split_is_seeded_and_disjoint(tiny: TrainableModel) -> None:
    examples = [Example([i, i + 1], [False, True]) for i in range(40)]
    train, evals = split(examples, 0.1, seed=3)
    assert len(evals) == 4 and len(train) == 36
    assert {id(e) for e in train}.isdisjoint({id(e) for e in evals})
    assert split(examples, 0.1, seed=3) == (train, evals)
    assert split(examples, 0.1, seed=4)[1] != evals


def test_packed_sequence_layout(tiny: TrainableModel) -> None:
    examples = _examples(tiny)
    total = sum(len(e) for e in examples)
    (seq,) = pack(examples, total + 5, pad_id=0)
    assert seq.seq_lens == [len(e) for e in examples] + [5]
    start = 0
    for e in examples:
        assert seq.positions[start : start + len(e)] == list(range(len(e)))
        # A sample's last token (its EOS) never predicts the next sample's first.
        assert seq.labels[start + len(e) - 1] == IGNORE_INDEX
        start += len(e)
    assert seq.labels[-5:] == [IGNORE_INDEX] * 5
    # Without packing, each sample gets a sequence of its own.
    assert len(pack(examples, total + 5, pad_id=0, packing=False)) == len(examples)
    # A sample that would overflow starts the next sequence.
    assert [s.seq_lens[:-1] for s in pack(examples, len(examples[1]) + 2, 0)][1] == [
        len(examples[1])
    ]


def test_packed_logits_equal_each_sample_alone(tiny: TrainableModel) -> None:
    examples = _examples(tiny)
    total = sum(len(e) for e in examples)
    batch = collate(pack(examples, total + 3, pad_id=0))
    with torch.no_grad():
        packed = packed_logits(tiny.model, batch)
    start = 0
    for e in examples:
        alone = collate(pack([e], len(e), pad_id=0))
        with torch.no_grad():
            alone_logits = packed_logits(tiny.model, alone)
        torch.testing.assert_close(packed[start : start + len(e)], alone_logits, rtol=0, atol=1e-5)
        cached = _alone_with_cache(tiny, e.token_ids)
        torch.testing.assert_close(packed[start : start + len(e)], cached, rtol=0, atol=1e-5)
        start += len(e)


def test_without_the_block_mask_samples_would_differ(tiny: TrainableModel) -> None:
    """The equality above is not vacuous: one causal block over the whole packed sequence
    (cross-sample attention) changes the later samples' logits."""
    examples = _examples(tiny)
    batch = collate(pack(examples, sum(len(e) for e in examples), pad_id=0))
    one_block = collate(pack(examples, sum(len(e) for e in examples), pad_id=0))
    object.__setattr__(one_block, "seq_lens", [sum(batch.seq_lens)])
    with torch.no_grad():
        blocked = packed_logits(tiny.model, batch)
        crossed = packed_logits(tiny.model, one_block)
    second = slice(len(examples[0]), len(examples[0]) + len(examples[1]))
    assert (blocked[second] - crossed[second]).abs().max() > 1e-3
