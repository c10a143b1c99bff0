"""kiln.text.Tokenizer against transformers' fast tokenizer on the shared checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from kiln.errors import ModelLoadError
from kiln.text import Tokenizer

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
MODEL_DIRS = ["stories260K", "smollm2-135m-instruct-gguf"]

TEXTS = [
    "Hello world",
    "",
    " leading space",
    "Once upon a time, there was a little girl named Lily.",
    "multiple   spaces\tand\nnewlines\n\n",
    "中文测试 한국어 🙂👍🏽",
    "def f(x):\n    return x ** 2  # square",
    "<s> literal special text </s>",
    "<|im_start|>user\nhi<|im_end|>",
]


def _model_dir(name: str) -> Path:
    path = MODELS / name
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"shared model {name} not available")
    return path


def _load(name: str, **config_overrides) -> tuple[Tokenizer, object]:
    import transformers  # a declared test dependency: missing, it must fail, not skip

    path = _model_dir(name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(config_overrides)
    ours = Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)
    if config_overrides:
        theirs = transformers.AutoTokenizer.from_pretrained(str(path), **config_overrides)
    else:
        theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    return ours, theirs


@pytest.fixture(params=MODEL_DIRS, scope="module")
def pair(request):
    return _load(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == theirs(text).input_ids
    assert (
        ours.encode(text, add_special_tokens=False)
        == theirs(text, add_special_tokens=False).input_ids
    )


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(pair, text):
    ours, theirs = pair
    ids = theirs(text).input_ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )


def test_special_tokens_match_transformers(pair):
    ours, theirs = pair
    assert ours.bos_token == theirs.bos_token
    assert ours.eos_token == theirs.eos_token
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.vocab_size == len(theirs)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template
    ids = theirs("Hello world, 你好").input_ids
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == theirs.convert_ids_to_tokens(ids[0])


def test_stories_adds_bos_smollm_does_not():
    stories, _ = _load("stories260K")
    smollm, _ = _load("smollm2-135m-instruct-gguf")
    assert stories.encode("hi")[0] == stories.bos_token_id == 1
    assert smollm.bos_token_id not in smollm.encode("hi")


@pytest.mark.parametrize(
    "flags",
    [
        {"add_bos_token": False},
        {"add_eos_token": True},
        {"add_bos_token": False, "add_eos_token": True},
    ],
)
def test_config_flags_override_post_processor_like_llama_fast(flags):
    ours, theirs = _load("stories260K", **flags)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids


def test_add_bos_flag_ignored_for_gpt2_class_like_transformers():
    # GPT2TokenizerFast stores add_bos_token but its post-processor never uses it.
    ours, theirs = _load("smollm2-135m-instruct-gguf", add_bos_token=True)
    assert ours.encode("Hello") == theirs("Hello").input_ids == [19556]


def test_encode_chat_never_adds_a_second_bos():
    ours, theirs = _load("stories260K")
    prompt = "<s>[INST] Hello [/INST]"
    ids = ours.encode_chat(prompt)
    assert ids.count(ours.bos_token_id) == 1
    assert ours.encode(prompt).count(ours.bos_token_id) == 2
    chat = [{"role": "user", "content": "Hello"}]
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert ids == theirs.apply_chat_template(chat, chat_template=template, tokenize=True)


def test_backend_is_not_mutated():
    path = _model_dir("stories260K")
    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.enable_truncation(4)
    before = backend.to_str()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["<extra_special>"]
    ours = Tokenizer(backend, config)
    assert backend.to_str() == before
    long = "Once upon a time, there was a little girl named Lily."
    assert len(ours.encode(long)) > 4  # truncation from tokenizer.json is not applied
    extra = ours.token_to_id("<extra_special>")
    assert extra is not None and extra in ours.all_special_ids
    assert ours.encode("a <extra_special> b", add_special_tokens=False).count(extra) == 1
    assert "<extra_special>" not in ours.decode(ours.encode("a <extra_special> b"))


def test_add_bos_without_bos_token_is_a_load_error():
    path = _model_dir("stories260K")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["bos_token"] = None
    with pytest.raises(ModelLoadError):
        Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)


def test_legacy_list_chat_template():
    path = _model_dir("stories260K")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    ours = Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)
    assert ours.chat_template == "D"
