"""Chat templates: parity with transformers' apply_chat_template, built-ins, validation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import tokenizers

from kiln.errors import InvalidRequestError, KilnError
from kiln.text import (
    ChatTemplate,
    Tokenizer,
    available_templates,
    builtin_template,
    load_chat_template,
    validate_messages,
)

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# fixture template -> the shared tokenizer it is tested with (its special tokens feed the template)
FIXTURE_TOKENIZERS = {
    "llama-2-chat": "stories260K",
    "llama-3-instruct": "stories260K",
    "mistral-instruct-v0.2": "stories260K",
    "qwen2-instruct": "smollm2-135m-instruct-gguf",
    "chatml": "smollm2-135m-instruct-gguf",
    "smollm2-instruct": "smollm2-135m-instruct-gguf",
    # Zephyr's template laid out as many checkpoints' are: `{% %}` blocks on their own, indented
    # lines. Only trim_blocks *and* lstrip_blocks (transformers' settings) render it unindented.
    "zephyr-indented": "stories260K",
}
# built-in name -> the public template it reproduces
BUILTIN_FIXTURES = {
    "llama-2": "llama-2-chat",
    "llama-3": "llama-3-instruct",
    "mistral": "mistral-instruct-v0.2",
    "chatml": "chatml",
}

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [SYSTEM, {"role": "user", "content": "Hello!"}],
    "multi_turn": [
        {"role": "user", "content": "My favorite color is blue."},
        {"role": "assistant", "content": "Noted: blue."},
        {"role": "user", "content": "  What is my favorite color?  "},
    ],
    "system_multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Bonjour, ça va ? 你好 🙂"},
        {"role": "assistant", "content": " Très bien.\n"},
        {"role": "user", "content": 'Write `x < y && y > z` in JSON: {"a": 1}'},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "Thanks.\n\nBye."},
    ],
}


def _fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def _tokenizer_config(model: str) -> tuple[Path, dict]:
    path = MODELS / model
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"shared model {model} not available")
    return path, json.loads((path / "tokenizer_config.json").read_text())


@functools.cache
def _pair(fixture: str) -> tuple[Tokenizer, object]:
    """Our tokenizer and transformers', both with the fixture template as chat_template."""
    import transformers  # a declared test dependency: missing, it must fail, not skip

    path, config = _tokenizer_config(FIXTURE_TOKENIZERS[fixture])
    config["chat_template"] = _fixture(fixture)
    ours = Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)
    keys = ["bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"]
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"),
        chat_template=config["chat_template"],
        **{k: config[k] for k in keys if config.get(k) is not None},
    )
    return ours, theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("fixture", FIXTURE_TOKENIZERS)
def test_render_matches_transformers(fixture, conversation, add_generation_prompt):
    ours, theirs = _pair(fixture)
    messages = CONVERSATIONS[conversation]
    template = load_chat_template(ours.tokenizer_config)
    text = template.render(
        messages, add_generation_prompt=add_generation_prompt, **ours.special_tokens_map
    )
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    expected_ids = theirs.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode_chat(text) == list(expected_ids)


def test_indented_blocks_are_stripped():
    # The exact text, so that it holds without transformers too: with lstrip_blocks off, the
    # indentation before each `{% if %}` / `{% elif %}` / `{% else %}` line would stay in it.
    template = ChatTemplate(_fixture("zephyr-indented"))
    text = template.render(CONVERSATIONS["system"], eos_token="</s>")
    assert text == (
        "<|system|>\nYou are a concise assistant.</s>\n<|user|>\nHello!</s>\n<|assistant|>\n"
    )


def test_shared_smollm2_template_matches_its_file():
    _, config = _tokenizer_config("smollm2-135m-instruct-gguf")
    assert config["chat_template"].strip() == _fixture("smollm2-instruct").strip()
    template = load_chat_template(config)
    assert template.render(CONVERSATIONS["single"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("builtin", BUILTIN_FIXTURES)
def test_builtin_renders_like_public_template(builtin, conversation, add_generation_prompt):
    special = {"bos_token": "<BOS>", "eos_token": "<EOS>"}
    public = ChatTemplate(_fixture(BUILTIN_FIXTURES[builtin]))
    ours = builtin_template(builtin)
    messages = CONVERSATIONS[conversation]
    kwargs = {"add_generation_prompt": add_generation_prompt, **special}
    assert ours.render(messages, **kwargs) == public.render(messages, **kwargs)


def test_available_templates():
    assert available_templates() == ["chatml", "llama-2", "llama-3", "mistral"]


@pytest.mark.parametrize("fixture", ["llama-2-chat", "mistral-instruct-v0.2"])
@pytest.mark.parametrize("builtin", [False, True])
def test_raise_exception_becomes_invalid_request(fixture, builtin):
    name = {v: k for k, v in BUILTIN_FIXTURES.items()}[fixture]
    template = builtin_template(name) if builtin else ChatTemplate(_fixture(fixture))
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        template.render(messages)


def test_template_errors_are_invalid_requests():
    with pytest.raises(InvalidRequestError, match="cannot render"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ messages[5]['content'] }}").render([{"role": "user", "content": "x"}])


def test_invalid_template_source():
    with pytest.raises(KilnError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo <actuelle> & prévisions",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOLS_TEMPLATE = """\
{%- if tools is not none %}
Tools:
{{ tools | tojson(indent=2) }}
{{ tools[0] | tojson }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- if loop.index > 3 %}{% break %}{% endif %}
[{{ message['role'] }}] {{ message['content'] }}
{%- endfor %}
{%- if add_generation_prompt %}
[assistant]{% endif %}
Year: {{ strftime_now('%Y') }}"""


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_tojson_loopcontrols_strftime_match_transformers(tools):
    import transformers  # a declared test dependency: missing, it must fail, not skip

    path, _ = _tokenizer_config("smollm2-135m-instruct-gguf")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), chat_template=TOOLS_TEMPLATE
    )
    messages = CONVERSATIONS["system_multi_turn"]
    expected = theirs.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    text = ChatTemplate(TOOLS_TEMPLATE).render(messages, tools=tools)
    assert text == expected
    if tools:
        assert "Météo <actuelle> & prévisions" in text  # no ASCII or HTML escaping


def test_tool_roles_pass_through():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
    ]
    text = builtin_template("chatml").render(messages[::2])
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    checked = validate_messages(messages)
    assert checked[1]["content"] is None and checked[1]["tool_calls"] == [{"id": "1"}]


def test_text_parts_are_joined():
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        }
    ]
    assert validate_messages(messages)[0]["content"] == "first\nsecond"
    assert "first\nsecond" in builtin_template("chatml").render(messages)
    assert isinstance(messages[0]["content"], list)  # the caller's messages are not modified


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role must be one of"),
        ([{"content": "x"}], "role must be one of"),
        ([{"role": "user"}], "has no content"),
        ([{"role": "user", "content": None}], "must be a string"),
        ([{"role": "user", "content": 42}], "string or a list of text parts"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "only text parts",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "needs 'text'"),
    ],
)
def test_invalid_messages(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        builtin_template("chatml").render(messages)


def test_load_chat_template_sources(tmp_path):
    config = {"chat_template": "{{ 'from config' }}"}
    assert load_chat_template(config).render(CONVERSATIONS["single"]) == "from config"
    assert load_chat_template(config, "llama-3").name == "llama-3"
    path = tmp_path / "mine.jinja"
    path.write_text("{{ 'from file' }}")
    assert load_chat_template(config, str(path)).render(CONVERSATIONS["single"]) == "from file"
    inline = load_chat_template({}, "{{ 'inline' }}")
    assert inline.render(CONVERSATIONS["single"]) == "inline"
    legacy = {"chat_template": [{"name": "default", "template": "{{ 'legacy' }}"}]}
    assert load_chat_template(legacy).render(CONVERSATIONS["single"]) == "legacy"


def test_missing_template_names_the_fixes():
    with pytest.raises(KilnError) as excinfo:
        load_chat_template({})
    message = str(excinfo.value)
    assert "--chat-template" in message
    assert all(name in message for name in available_templates())
    with pytest.raises(KilnError, match="neither a file nor a built-in"):
        load_chat_template({}, "no-such-template")
    with pytest.raises(KilnError, match="no built-in chat template"):
        builtin_template("llama-9")
