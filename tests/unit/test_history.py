"""History truncation: fit_history and render_prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from kiln.errors import ContextLengthError, InvalidRequestError
from kiln.text import Tokenizer, builtin_template, fit_history, load_chat_template, render_prompt

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"

SYSTEM = {"role": "system", "content": "You are a helpful assistant with a good memory."}
# The tutorials' dialogue: each question needs what was said before it.
DIALOGUE = [
    {"role": "user", "content": "My favorite color is blue. My favorite fruit is strawberry."},
    {"role": "assistant", "content": "Got it: blue, and strawberries."},
    {"role": "user", "content": "Name a fruit that is on my favorite colour."},
    {"role": "assistant", "content": "Blueberries are blue."},
    {"role": "user", "content": "What is the colour of my favorite fruit?"},
]


def _tokenizer(model: str) -> Tokenizer:
    path = MODELS / model
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"shared model {model} not available")
    config = json.loads((path / "tokenizer_config.json").read_text())
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)


@pytest.fixture(
    params=[("smollm2-135m-instruct-gguf", None), ("stories260K", "llama-2")],
    ids=["smollm2-own-template", "stories-llama-2"],
    scope="module",
)
def setup(request):
    model, override = request.param
    tokenizer = _tokenizer(model)
    return tokenizer, load_chat_template(tokenizer.tokenizer_config, override)


def _count(tokenizer, template, messages) -> int:
    text = template.render(messages, **tokenizer.special_tokens_map)
    return len(tokenizer.encode_chat(text))


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("num_dropped", [0, 1, 2])
def test_tutorial_dialogue(setup, with_system, num_dropped):
    tokenizer, template = setup
    system = [SYSTEM] if with_system else []
    messages = system + DIALOGUE
    expected = system + DIALOGUE[2 * num_dropped :]
    budget = _count(tokenizer, template, expected)
    text, ids, kept = render_prompt(template, tokenizer, messages, max_tokens=budget)
    assert kept == expected
    assert len(ids) <= budget
    assert ids == tokenizer.encode_chat(text)
    assert text == template.render(expected, **tokenizer.special_tokens_map)
    if num_dropped < 2:
        # One token less and the next oldest exchange must go too.
        kept = render_prompt(template, tokenizer, messages, max_tokens=budget - 1)[2]
        assert kept == system + DIALOGUE[2 * (num_dropped + 1) :]


def test_last_message_too_long(setup):
    tokenizer, template = setup
    messages = [SYSTEM, *DIALOGUE]
    needed = _count(tokenizer, template, [SYSTEM, DIALOGUE[-1]])
    with pytest.raises(ContextLengthError) as excinfo:
        render_prompt(template, tokenizer, messages, max_tokens=needed - 1)
    assert f"needs {needed} tokens" in str(excinfo.value)
    assert f"budget is {needed - 1} tokens" in str(excinfo.value)


def test_no_budget_keeps_everything(setup):
    tokenizer, template = setup
    text, _, kept = render_prompt(template, tokenizer, DIALOGUE, add_generation_prompt=False)
    assert kept == DIALOGUE
    assert text == template.render(
        DIALOGUE, add_generation_prompt=False, **tokenizer.special_tokens_map
    )
    with pytest.raises(InvalidRequestError):
        render_prompt(template, tokenizer, DIALOGUE, max_tokens=0)


def test_render_prompt_never_doubles_bos():
    tokenizer = _tokenizer("stories260K")
    _, ids, _ = render_prompt(builtin_template("mistral"), tokenizer, DIALOGUE)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


# --- fit_history on its own, with a stand-in token count --------------------------------------


def _chars(messages) -> int:
    return sum(len(m["content"] or "") for m in messages)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_exchanges_are_dropped_whole():
    messages = [
        _msg("system", "S"),
        _msg("system", "T"),
        _msg("assistant", "greeting"),  # before any user message: its own exchange
        _msg("user", "u1"),
        _msg("assistant", "a1"),
        _msg("user", "u2"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        _msg("tool", "result"),
        _msg("assistant", "a2"),
        _msg("user", "u3"),
    ]
    assert fit_history(messages, _chars, 100) == messages
    assert fit_history(messages, _chars, _chars(messages) - 1) == messages[:2] + messages[3:]
    assert fit_history(messages, _chars, 16) == messages[:2] + messages[5:]
    assert fit_history(messages, _chars, 4) == [*messages[:2], messages[-1]]
    with pytest.raises(ContextLengthError):
        fit_history(messages, _chars, 3)


def test_single_exchange_or_system_only():
    assert fit_history([_msg("user", "hi")], _chars, 2) == [_msg("user", "hi")]
    with pytest.raises(ContextLengthError, match="needs 2 tokens"):
        fit_history([_msg("user", "hi")], _chars, 1)
    with pytest.raises(ContextLengthError):
        fit_history([_msg("system", "long system prompt")], _chars, 5)


def test_conversation_ending_with_assistant_keeps_its_last_exchange():
    messages = [
        _msg("user", "aaaa"),
        _msg("assistant", "bbbb"),
        _msg("user", "c"),
        _msg("assistant", "d"),
    ]
    assert fit_history(messages, _chars, 2) == messages[2:]


def test_count_is_called_logarithmically():
    calls = []

    def count(messages):
        calls.append(len(messages))
        return _chars(messages)

    messages = [_msg("system", "s")]
    for i in range(500):
        messages += [_msg("user", f"question {i}"), _msg("assistant", f"answer {i}")]
    messages.append(_msg("user", "last"))
    budget = 1 + len("last") + sum(len(f"question {i}answer {i}") for i in range(490, 500))
    kept = fit_history(messages, count, budget)
    assert kept == [messages[0], *messages[1 + 2 * 490 :]]
    assert len(calls) <= 2 + 10  # both ends, then bisection over 500 exchanges
