"""Using the result of `kiln finetune`: `kiln serve --model BASE --adapter OUT/adapter` (the
adapter not merged) answers exactly as `kiln serve --model OUT` (merged) does, through real
servers on loopback; `kiln finetune eval` reproduces the run's eval losses; `kiln generate
--instruction --context` prompts in the training format."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kiln import LLM, SamplingParams
from kiln.train.data import dolly_prompt
from server_harness import kiln_serve

KILN = Path(sys.executable).with_name("kiln")
DOLLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "dolly"
PROMPTS = [
    dolly_prompt("Why can camels survive for long without water?"),
    dolly_prompt("Who ran?", "A dog ran to the park."),
]
MAX_NEW_TOKENS = 24


def _kiln(*args: str) -> subprocess.CompletedProcess:
    command = [str(KILN)] if KILN.is_file() else [sys.executable, "-m", "kiln.cli.main"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


SPLIT = ["--sequence-length", "128", "--eval-fraction", "0.2", "--seed", "4", "--threads", "1"]


@dataclass
class Tuned:
    out: Path
    data: Path
    stdout: str


@pytest.fixture(scope="module")
def tuned(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    tmp = tmp_path_factory.mktemp("finetune_output")
    data = tmp / "dolly.jsonl"
    lines = (DOLLY / "databricks-dolly-15k.head.jsonl").read_text().splitlines()[:30]
    data.write_text("\n".join(lines) + "\n")
    out = tmp / "tuned"
    run = _kiln(
        "finetune", "--model", str(stories_dir), "--data", str(data), "-o", str(out),
        "--max-steps", "4", "--batch-size", "2", "--lora-r", "4", "--lora-alpha", "8",
        "--lr", "3e-2", *SPLIT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return Tuned(out, data, run.stdout)


def _served_tokens(url: str) -> list[list[int]]:
    tokens = []
    for prompt in PROMPTS:
        body = {
            "inputs": prompt,
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True},
        }
        response = httpx.post(url + "/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        tokens.append([t["id"] for t in response.json()["details"]["tokens"]])
    return tokens


def test_served_adapter_equals_served_merged_model(
    stories_dir: Path, tuned: Tuned, tmp_path: Path
) -> None:
    adapter = str(tuned.out / "adapter")
    with kiln_serve(stories_dir, tmp_path, "--dtype", "float32", "--adapter", adapter) as server:
        with_adapter = _served_tokens(server.url)
    with kiln_serve(tuned.out, tmp_path, "--dtype", "float32") as server:
        merged = _served_tokens(server.url)
    assert with_adapter == merged

    # ...and the adapter changed the answers: the base model's greedy tokens differ.
    base = LLM(str(stories_dir), dtype="float32", kv_cache_memory=16 << 20)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    assert [o.token_ids for o in base.generate(PROMPTS, greedy)] != merged


def _losses(text: str) -> list[str]:
    return re.findall(r"(?:eval loss|eval loss before:|eval loss after:)\s+(\d+\.\d{4})", text)


def test_finetune_eval_scores_the_held_out_records(stories_dir: Path, tuned: Tuned) -> None:
    before, after = _losses(tuned.stdout)
    common = ["finetune", "eval", "--data", str(tuned.data), *SPLIT]
    run = _kiln(*common, "--model", str(stories_dir), "--adapter", str(tuned.out / "adapter"))
    assert run.returncode == 0, run.stderr
    assert _losses(run.stdout) == [before, after]
    assert "before: " in run.stdout and "after: " in run.stdout and "perplexity" in run.stdout
    run = _kiln(*common, "--model", str(tuned.out), "--base", str(stories_dir))
    assert run.returncode == 0, run.stderr
    assert _losses(run.stdout) == [before, after]
    assert float(after) != float(before)


def test_generate_with_an_instruction_and_context(tuned: Tuned) -> None:
    instruction, context = "Who ran to the park?", "A dog ran to the park."
    run = _kiln(
        "generate", "--model", str(tuned.out), "--instruction", instruction,
        "--context", context, "--max-new-tokens", "8", "--dtype", "float32", "--threads", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    prompt = dolly_prompt(instruction, context)
    assert prompt.startswith("### Instruction\nWho ran to the park?\n\n### Context\nA dog")
    llm = LLM(str(tuned.out), dtype="float32", kv_cache_memory=16 << 20)
    (expected,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert run.stdout == prompt + expected.text + "\n"

    refused = _kiln("generate", "--model", str(tuned.out), "--context", context)
    assert refused.returncode == 2 and "--context goes with --instruction" in refused.stderr
