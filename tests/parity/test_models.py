"""Logits and greedy tokens of kiln's models against transformers on the same weights.

Tiny random configs of every supported architecture, saved as real Hugging Face checkpoints
(with the stories260K tokenizer) and loaded through kiln's full stack.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.models.layers.attention import AttentionMetadata

SHARED_MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
STORIES = SHARED_MODELS / "stories260K"
VOCAB = 512  # the stories260K tokenizer's vocabulary
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)
LLAMA_LIKE = dict(
    SMALL, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2
)

CONFIGS = {
    "llama3": transformers.LlamaConfig(
        **LLAMA_LIKE,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama2": transformers.LlamaConfig(
        **{**LLAMA_LIKE, "num_key_value_heads": 4}, tie_word_embeddings=True
    ),
    "codellama": transformers.LlamaConfig(**LLAMA_LIKE, rope_theta=1_000_000.0),
    "llama-linear-rope": transformers.LlamaConfig(
        **LLAMA_LIKE, rope_scaling={"type": "linear", "factor": 2.0}
    ),
    "mistral": transformers.MistralConfig(**LLAMA_LIKE, sliding_window=16),
    "qwen2": transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=True),
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


def _save_checkpoint(hf_config: transformers.PretrainedConfig, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        # NOTE: wider than the default init so logits are peaked and greedy ties cannot flip.
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.25)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, path / name)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = _save_checkpoint(CONFIGS[request.param], path)
    return hf_model, LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=8 << 20)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (23, 9)]


def test_prefill_logits_match_transformers(pair) -> None:
    hf_model, llm = pair
    prompts = _prompts()
    # Two sequences of different lengths in one flattened batch; non-contiguous blocks.
    block_size = llm.engine.block_size
    tables = [[5, 2, 7], [0]]
    metadata = AttentionMetadata.build(
        [0, 0], [len(p) for p in prompts], tables, block_size, llm.config.sliding_window
    )
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.inference_mode():
        hidden = llm.model(input_ids, positions, llm.engine.runner.kv_caches, metadata)
        logits = llm.model.compute_logits(hidden)
        expected = torch.cat([hf_model(torch.tensor([p])).logits[0] for p in prompts])
    assert (logits - expected).abs().max().item() <= 1e-4


def test_greedy_64_tokens_match_transformers(pair) -> None:
    hf_model, llm = pair
    prompts = _prompts()
    # min_new_tokens blocks EOS on both sides, as transformers does with min_new_tokens.
    params = SamplingParams(temperature=0.0, max_new_tokens=64, min_new_tokens=64)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref


def test_paged_prefill_writes_the_mapped_slots_and_a_later_chunk_reads_them(pair) -> None:
    """The KV cache holds each token at ``block_table[pos // block_size] * block_size + pos %
    block_size``, and nowhere else; a second prefill chunk that reads the first from there
    gives transformers' logits. (A wrong slot mapping used the same way for writes and reads
    would pass a one-chunk comparison.)"""
    hf_model, llm = pair
    prompt = _prompts()[0]  # 23 tokens
    block_size = llm.engine.block_size
    table = [5, 2, 7]
    config = llm.config
    kv_caches = [
        torch.zeros(2, 8 * block_size, config.num_key_value_heads, config.head_dim)
        for _ in range(config.num_hidden_layers)
    ]
    split = 15
    with torch.inference_mode():
        logits = []
        for start, stop in ((0, split), (split, len(prompt))):
            metadata = AttentionMetadata.build(
                [start], [stop - start], [table], block_size, config.sliding_window
            )
            hidden = llm.model(
                torch.tensor(prompt[start:stop]), torch.arange(start, stop), kv_caches, metadata
            )
            logits.append(llm.model.compute_logits(hidden))
        expected = hf_model(torch.tensor([prompt])).logits[0]
    written = {
        int(slot) for slot in (kv_caches[0].abs().sum(dim=(0, 2, 3)) != 0).nonzero().flatten()
    }
    mapped = {
        table[pos // block_size] * block_size + pos % block_size for pos in range(len(prompt))
    }
    assert written == mapped
    assert (torch.cat(logits) - expected).abs().max().item() <= 1e-4
