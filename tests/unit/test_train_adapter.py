"""A trained adapter served without merging gives the merged model's logits; transformers
loads the merged output directory and agrees with kiln; adapters that do not fit are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kiln import LLM
from kiln.bench.perplexity import prompt_hidden
from kiln.errors import ModelLoadError
from kiln.train.config import TrainConfig
from kiln.train.data import dolly_prompt, read_dolly, split, tokenize_dolly
from kiln.train.lora import LoRAConfig
from kiln.train.model_io import load_for_training
from kiln.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"
PROMPT = dolly_prompt("Why can camels survive for long without water?")
# A large learning rate: after a few steps the adapter moves the logits well past tolerance.
CONFIG = TrainConfig(
    sequence_length=128,
    lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
    max_steps=4,
    batch_size=2,
    lr=3e-2,
    warmup_steps=1,
    eval_fraction=0.1,
    seed=1,
)


@pytest.fixture(scope="module")
def tuned(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K after a short LoRA run: the merged model, and the adapter in ``adapter/``."""
    out = tmp_path_factory.mktemp("tuned")
    tiny = load_for_training(str(stories_dir))
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in read_dolly(DOLLY)[:30]]
    train, evals = split(examples, CONFIG.eval_fraction, CONFIG.seed)
    trainer = Trainer(tiny, train, evals, CONFIG, out, progress=False)
    trainer.run()
    trainer.export()
    return out


def _logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """Every position's logits through the serving forward (paged KV cache)."""
    with torch.inference_mode():
        return llm.model.compute_logits(prompt_hidden(llm, token_ids)).float()


def test_adapter_without_merging_equals_merged(stories_dir: Path, tuned: Path) -> None:
    merged = LLM(str(tuned), dtype="float32", kv_cache_memory=16 << 20)
    adapted = LLM(
        str(stories_dir), dtype="float32", adapter=str(tuned / "adapter"), kv_cache_memory=16 << 20
    )
    base = LLM(str(stories_dir), dtype="float32", kv_cache_memory=16 << 20)
    token_ids = merged.tokenizer.encode(PROMPT)
    expected = _logits(merged, token_ids)
    assert (_logits(base, token_ids) - expected).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_logits(adapted, token_ids), expected, rtol=0, atol=1e-4)


def test_transformers_loads_the_merged_model(tuned: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tuned), torch_dtype=torch.float32)
    kiln = LLM(str(tuned), dtype="float32", kv_cache_memory=16 << 20)
    token_ids = kiln.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        theirs = hf(torch.tensor([token_ids])).logits[0].float()
    torch.testing.assert_close(_logits(kiln, token_ids), theirs, rtol=0, atol=1e-4)


def test_an_adapter_for_another_model_is_refused(
    stories_dir: Path, tuned: Path, tmp_path: Path
) -> None:
    # Same tensors, but rank 4 claimed as 8 in one layer's A: a shape this model cannot take.
    wrong = tmp_path / "wrong"
    shutil.copytree(tuned / "adapter", wrong)
    weights = load_file(str(wrong / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    weights[key] = torch.cat([weights[key], weights[key]])
    save_file(weights, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="another model"):
        LLM(str(stories_dir), dtype="float32", adapter=str(wrong), kv_cache_memory=16 << 20)

    # A tensor for a layer this model does not have.
    weights = load_file(str(tuned / "adapter" / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.99.mlp.up_proj.lora_A.weight"] = weights[key].clone()
    save_file(weights, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="match no layer"):
        LLM(str(stories_dir), dtype="float32", adapter=str(wrong), kv_cache_memory=16 << 20)

    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ModelLoadError, match="use_dora"):
        LLM(str(stories_dir), dtype="float32", adapter=str(wrong), kv_cache_memory=16 << 20)
