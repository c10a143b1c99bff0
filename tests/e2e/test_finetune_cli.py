"""`kiln finetune` end to end: the console script trains a tiny real Llama on Dolly records,
writes a Hugging Face directory, and `kiln generate --model OUT` serves it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from kiln import LLM, SamplingParams
from kiln.train.data import dolly_prompt

KILN = Path(sys.executable).with_name("kiln")
DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"


def _kiln(*args: str) -> subprocess.CompletedProcess:
    command = [str(KILN)] if KILN.is_file() else [sys.executable, "-m", "kiln.cli.main"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_finetune_then_generate(stories_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "dolly.jsonl"
    lines = (DOLLY / "databricks-dolly-15k.head.jsonl").read_text().splitlines()[:30]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tuned"
    run = _kiln(
        "finetune", "--model", str(stories_dir), "--data", str(data), "--output", str(out),
        "--sequence-length", "128", "--max-steps", "3", "--batch-size", "2",
        "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--save-every", "2",
        "--eval-fraction", "0.2", "--threads", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "eval loss before:" in run.stdout and "eval loss after:" in run.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-00000002").is_dir()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]

    # The merged weights differ from the base model's (training happened) in HF names.
    tuned = load_file(str(out / "model.safetensors"))
    base = load_file(str(stories_dir / "model.safetensors"))
    assert tuned.keys() == base.keys()
    assert not torch.equal(tuned["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip

    prompt = dolly_prompt("Why can camels survive for long without water?")
    gen = _kiln("generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", "8")
    assert gen.returncode == 0, gen.stderr
    llm = LLM(str(out), dtype="float32")
    (expected,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert gen.stdout == prompt + expected.text + "\n"


def test_finetune_chat_format(stories_dir: Path, tmp_path: Path) -> None:
    """--format chat: conversations through a chat template (stories260K has none: the built-in
    chatml), trained end to end."""
    data = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in (DOLLY / "databricks-dolly-15k.head.jsonl").open()]
    # Short ones: stories260K's 512-token vocabulary spells English out in many tokens.
    rows = [r for r in rows if not r["context"] and len(r["response"]) < 200][:20]
    conversations = [
        {"messages": [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["response"]},
        ]}
        for r in rows
    ]  # fmt: skip
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    out = tmp_path / "tuned"
    run = _kiln(
        "finetune", "--model", str(stories_dir), "--data", str(data), "-o", str(out),
        "--format", "chat", "--chat-template", "chatml", "--sequence-length", "256",
        "--max-steps", "2", "--batch-size", "2", "--lora-r", "4", "--eval-fraction", "0.2",
        "--threads", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["loss"] > 0 for r in records if "loss" in r)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # Without a template (the model has none, none given) the error says what to pass.
    run = _kiln(
        "finetune", "--model", str(stories_dir), "--data", str(data), "-o", str(tmp_path / "x"),
        "--format", "chat",
    )  # fmt: skip
    assert run.returncode == 2 and "--chat-template" in run.stderr
