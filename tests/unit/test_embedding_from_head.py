"""A tied model whose quantized head holds exactly its embedding's values looks the embedding up
in the head (no float matrix in memory or in an artifact), bit-identical to the float lookup;
one whose head differs (a float checkpoint quantized to int8) keeps its float embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kiln import LLM, SamplingParams
from kiln.config import ModelConfig
from kiln.export import ExportOptions, export_artifact, read_manifest
from kiln.export.manifest import WEIGHTS_FILE
from kiln.kernels.native import cpu_kernels
from kiln.models.loader import build_model
from kiln.weights.resolve import resolve_checkpoint

pytestmark = pytest.mark.skipif(
    cpu_kernels() is None, reason="kiln's quantized CPU kernels cannot run here"
)

EMBEDDING = "model.embed_tokens.weight"


def _model(path: Path, quantize: str | None) -> torch.nn.Module:
    checkpoint = resolve_checkpoint(str(path))
    config = ModelConfig.from_hf(checkpoint.config, checkpoint.generation_config)
    return build_model(checkpoint, config, torch.float32, torch.device("cpu"), quantize=quantize)


def test_gguf_q8_embedding_is_read_from_the_head_bit_identically(smollm2_gguf: Path) -> None:
    kept = _model(smollm2_gguf, None)  # Q8_0 embedding, tied 8-bit head
    floats = _model(smollm2_gguf, "none")  # the embedding dequantized, as transformers reads it
    assert kept.embeds_from_head and not floats.embeds_from_head
    # The head took the GGUF's own Q8_0 blocks: they dequantize to the float table exactly.
    assert torch.equal(kept.lm_head.dense_weight(), floats.model.embed_tokens.weight)
    assert kept.quantized_sources == {} and floats.quantized_sources == {}  # nothing held
    assert EMBEDDING not in kept.state_dict() and EMBEDDING in floats.state_dict()
    vocab = kept.config.vocab_size
    ids = torch.tensor([0, 1, 17, 4242, vocab - 1, 17])
    expected = floats.model.embed_tokens(ids)
    assert torch.equal(kept.model.embed_tokens(ids), expected)
    assert torch.equal(kept.model.embed_tokens(ids.view(2, 3)), expected.view(2, 3, -1))


def test_a_head_that_differs_keeps_the_float_embedding(stories_dir: Path) -> None:
    model = _model(stories_dir, "int8")  # tied, float checkpoint: the int8 head only approximates
    assert model.config.tie_word_embeddings and model.lm_head.bits == 8
    assert not model.embeds_from_head and EMBEDDING in model.state_dict()


def test_artifact_stores_no_float_embedding_and_answers_the_same(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    artifact = tmp_path / "a"
    export_artifact(str(smollm2_gguf), artifact, ExportOptions(1, 256, "fp32", None))
    manifest = read_manifest(artifact)
    assert manifest is not None and manifest.embedding_from_head
    with safe_open(str(artifact / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
    assert EMBEDDING not in names and "lm_head.qblocks" in names
    # The 8-bit head alone: 49,152 rows of 18 blocks of 34 bytes, and no 49,152 x 576 floats.
    assert (artifact / WEIGHTS_FILE).stat().st_size < 100 * 2**20
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    prompts = ["What is the capital of France?", "Once upon a time"]
    loaded = LLM(str(artifact))
    assert loaded.model.embeds_from_head
    original = LLM(str(smollm2_gguf), device="cpu", max_model_len=256)
    assert [o.token_ids for o in loaded.generate(prompts, greedy)] == [
        o.token_ids for o in original.generate(prompts, greedy)
    ]
