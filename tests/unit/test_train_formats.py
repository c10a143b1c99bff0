"""Record formats for fine-tuning: Alpaca's prompt, and chat conversations through a real chat
template (SmolLM2-135M-Instruct's) with the loss on assistant turns only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from kiln.errors import ConfigError
from kiln.text import Tokenizer, load_chat_template
from kiln.train.formats import alpaca_prompt, load_examples, tokenize_chat

SMOLLM2 = Path(__file__).resolve().parents[3] / "shared" / "models" / "smollm2-135m-instruct-gguf"

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    config = json.loads((SMOLLM2 / "tokenizer_config.json").read_text())
    return Tokenizer(tokenizers.Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json")), config)


def _no_template() -> None:
    raise AssertionError("only the chat format needs a template")


def test_alpaca_records_in_alpaca_prompt(smollm2: Tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "alpaca_data.json"  # a JSON array, as Alpaca ships it
    rows = [
        {"instruction": "Give a colour.", "input": "", "output": "Blue."},
        {"instruction": "Summarise.", "input": "The cat sat on the mat.", "output": "A cat sat."},
    ]
    data.write_text(json.dumps(rows))
    examples = load_examples(data, "alpaca", smollm2, _no_template)
    assert len(examples) == 2
    for example, row in zip(examples, rows, strict=True):
        prompt = [t for t, m in zip(example.token_ids, example.loss_mask, strict=True) if not m]
        answer = [t for t, m in zip(example.token_ids, example.loss_mask, strict=True) if m]
        assert smollm2.decode(prompt) == alpaca_prompt(row["instruction"], row["input"])
        assert answer[-1] == smollm2.eos_token_id
        assert smollm2.decode(answer[:-1]) == row["output"]
    assert "### Input:\nThe cat sat on the mat.\n\n### Response:\n" in alpaca_prompt(
        "Summarise.", "The cat sat on the mat."
    )
    assert "### Input" not in alpaca_prompt("Give a colour.")

    data.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ConfigError, match=r"alpaca_data.json\[0\]: no string output"):
        load_examples(data, "alpaca", smollm2, _no_template)


def test_chat_loss_on_assistant_turns_only(smollm2: Tokenizer) -> None:
    template = load_chat_template(smollm2.tokenizer_config)
    example = tokenize_chat(CONVERSATION, smollm2, template)
    # Tokenized turn by turn, the whole is what the rendered conversation tokenizes to.
    rendered = template.render(CONVERSATION, add_generation_prompt=False)
    assert example.token_ids == smollm2.encode_chat(rendered)
    pieces, current, learn = [], [], None
    for token, mask in zip(example.token_ids, example.loss_mask, strict=True):
        if mask != learn and current:
            pieces.append((learn, smollm2.decode(current, skip_special_tokens=False)))
            current = []
        current.append(token)
        learn = mask
    pieces.append((learn, smollm2.decode(current, skip_special_tokens=False)))
    assert [text for learn, text in pieces if learn] == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    prompts = [text for learn, text in pieces if not learn]
    assert prompts[0].endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1] == "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_records_from_jsonl(smollm2: Tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n")
    template = load_chat_template(smollm2.tokenizer_config)
    (example,) = load_examples(data, "chat", smollm2, lambda: template)
    assert sum(example.loss_mask) > 0

    data.write_text(json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    with pytest.raises(ConfigError, match=r"chat.jsonl:1: .*nothing to learn"):
        load_examples(data, "chat", smollm2, lambda: template)
    data.write_text(json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ConfigError, match=r"chat.jsonl:1: messages must be a list"):
        load_examples(data, "chat", smollm2, lambda: template)
