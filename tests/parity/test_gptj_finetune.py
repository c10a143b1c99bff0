"""GPT-J fine-tunes as the Llama family does: LoRA on its fused q/k/v, out_proj, fc_in and
fc_out through kiln's trainer; the adapter served without merging equals the merged model, and
transformers loads the merged directory with kiln's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_models import CONFIGS, _save_checkpoint

from kiln import LLM
from kiln.bench.perplexity import prompt_hidden
from kiln.train.config import TrainConfig
from kiln.train.data import dolly_prompt, read_dolly, split, tokenize_dolly
from kiln.train.lora import LoRAConfig
from kiln.train.loss import mean_loss
from kiln.train.model_io import load_for_training
from kiln.train.trainer import Trainer

DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"
PROMPT = dolly_prompt("Why can camels survive for long without water?")
CONFIG = TrainConfig(
    sequence_length=128,
    lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
    max_steps=6,
    batch_size=2,
    lr=3e-2,
    warmup_steps=1,
    eval_fraction=0.2,
    seed=1,
)


@pytest.fixture(scope="module")
def gptj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gptj")
    _save_checkpoint(CONFIGS["gptj"], path)
    return path


@pytest.fixture(scope="module")
def tuned(gptj: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    """The merged model and its adapter after a short LoRA run, with the eval loss before and
    after it."""
    out = tmp_path_factory.mktemp("gptj-tuned")
    tiny = load_for_training(str(gptj))
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in read_dolly(DOLLY)[:30]]
    train, evals = split(examples, CONFIG.eval_fraction, CONFIG.seed)
    trainer = Trainer(tiny, train, evals, CONFIG, out, progress=False)
    before = mean_loss(trainer.model, trainer.eval_batches)
    trainer.run()
    after = mean_loss(trainer.model, trainer.eval_batches)
    trainer.export()
    return out, before, after


def _logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model.compute_logits(prompt_hidden(llm, token_ids)).float()


def test_lora_trains_every_gptj_projection_and_lowers_the_loss(tuned) -> None:
    out, before, after = tuned
    assert after < before
    names = set(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    for proj in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in"):
        assert f"base_model.model.transformer.h.0.{proj}.lora_A.weight" in names
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]


def test_gptj_adapter_served_equals_merged_and_transformers_agrees(gptj: Path, tuned) -> None:
    out = tuned[0]
    merged = LLM(str(out), dtype="float32", kv_cache_memory=8 << 20)
    adapted = LLM(str(gptj), dtype="float32", adapter=str(out / "adapter"), kv_cache_memory=8 << 20)
    base = LLM(str(gptj), dtype="float32", kv_cache_memory=8 << 20)
    token_ids = merged.tokenizer.encode(PROMPT)[:100]
    expected = _logits(merged, token_ids)
    assert (_logits(base, token_ids) - expected).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_logits(adapted, token_ids), expected, rtol=0, atol=1e-4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(torch.tensor([token_ids])).logits[0].float()
    torch.testing.assert_close(expected, theirs, rtol=0, atol=1e-4)


def test_full_gptj_fine_tuning_with_checkpointing_gives_the_same_losses(
    gptj: Path, tmp_path: Path
) -> None:
    """Every weight trains (LayerNorms and biases included), and gradient checkpointing over
    GPT-J's blocks changes no loss."""
    tiny = load_for_training(str(gptj))
    examples = [tokenize_dolly(r, tiny.tokenizer) for r in read_dolly(DOLLY)[:12]]
    losses = []
    for checkpointing in (False, True):
        model = load_for_training(str(gptj))
        config = TrainConfig(
            sequence_length=128, lora=None, max_steps=2, batch_size=2, lr=1e-3,
            warmup_steps=1, eval_fraction=0.2, seed=1, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        train, evals = split(examples, config.eval_fraction, config.seed)
        ln = model.model.transformer.h[0].ln_1.weight.detach().clone()
        trainer = Trainer(
            model, train, evals, config, tmp_path / str(checkpointing), progress=False
        )
        trainer.run()
        assert not torch.equal(trainer.model.transformer.h[0].ln_1.weight, ln)
        losses.append(mean_loss(trainer.model, trainer.eval_batches))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
