"""The tensor-parallel transform without processes: degrees, splits, and each rank's part of
the real stories260K checkpoint (8 heads, 4 KV heads, tied 512-token vocabulary, MLP 172)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kiln.config import ConfigError, EngineArgs, ModelConfig
from kiln.errors import InvalidRequestError
from kiln.models.layers.linear import Linear
from kiln.models.loader import allocate_model
from kiln.parallel.group import TensorParallelGroup, split
from kiln.parallel.layers import RowParallelLinear, VocabParallelEmbedding
from kiln.parallel.shard import check_tp_degree, rank_config, shard_model
from kiln.weights.resolve import resolve_checkpoint


def test_split_is_even_then_one_more_for_the_first_ranks() -> None:
    assert [split(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert [split(97, 2, r) for r in range(2)] == [(0, 49), (49, 48)]
    assert [split(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]


def test_a_degree_that_does_not_divide_lists_the_valid_ones(stories_dir: Path) -> None:
    config = ModelConfig.from_hf(resolve_checkpoint(str(stories_dir)).config)
    check_tp_degree(config, 4)
    with pytest.raises(ConfigError, match=r"tp=8 .*: 1, 2, 4$"):
        check_tp_degree(config, 8)  # 8 heads, but 4 KV heads
    llama_13b = dataclasses.replace(
        config, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000
    )
    with pytest.raises(ConfigError, match=r"valid degrees: 1, 2, 4, 5, 8, 10, 20, 40$"):
        check_tp_degree(llama_13b, 3)
    half = rank_config(config, 2)
    assert (half.num_attention_heads, half.num_key_value_heads) == (4, 2)


def _rank_weights(stories_dir: Path, rank: int, sliced_reads: bool) -> tuple:
    checkpoint = resolve_checkpoint(str(stories_dir))
    config = ModelConfig.from_hf(checkpoint.config)
    model = allocate_model(config, torch.float32, torch.device("cpu"), None)
    sharded = shard_model(model, TensorParallelGroup(rank, 2))
    weights = sharded.read(checkpoint) if sliced_reads else sharded.slice(checkpoint.load_weights())
    return model, dict(weights)


def test_each_rank_reads_its_part_and_the_parts_make_the_whole(stories_dir: Path) -> None:
    full = dict(resolve_checkpoint(str(stories_dir)).load_weights())
    ranks = [_rank_weights(stories_dir, rank, sliced_reads=True) for rank in range(2)]
    for rank in range(2):  # reading slices from the file = reading whole tensors, then slicing
        _, whole_then_sliced = _rank_weights(stories_dir, rank, sliced_reads=False)
        for name, tensor in whole_then_sliced.items():
            assert torch.equal(ranks[rank][1][name], tensor), name
    (model, first), (_, second) = ranks
    layer = "model.layers.0"
    for column in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"):
        name = f"{layer}.{column}.weight"
        assert torch.equal(torch.cat([first[name], second[name]]), full[name])
    for row in ("self_attn.o_proj", "mlp.down_proj"):
        name = f"{layer}.{row}.weight"
        assert torch.equal(torch.cat([first[name], second[name]], dim=1), full[name])
    name = "model.embed_tokens.weight"
    assert torch.equal(torch.cat([first[name], second[name]]), full[name])
    # The module tree holds one rank's share: half the heads, 86 of 172 MLP rows.
    attention = model.model.layers[0].self_attn
    assert (attention.num_heads, attention.num_kv_heads, attention.attn.num_kv_heads) == (4, 2, 2)
    assert isinstance(attention.o_proj, RowParallelLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Linear)
    assert model.model.layers[0].mlp.gate_up_proj.output_sizes == [86, 86]
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding)
    assert model.fused_decode is False  # kiln_llama_decode runs whole models only


def test_tp_reaches_engine_args_from_every_command() -> None:
    from kiln.cli.options import ModelOptions
    from kiln.cli.serve import ServedModels, model_specs

    assert ModelOptions(tp=2).engine_args().tp == 2
    specs, _ = model_specs(ServedModels(model=["tiny=/models/tiny"], tp=2))
    assert specs[0].args.tp == 2
    with pytest.raises(InvalidRequestError, match="--tp must be >= 1"):
        ModelOptions(tp=0)
    with pytest.raises(ConfigError, match="tp must be an integer >= 1"):
        EngineArgs(tp=0)
