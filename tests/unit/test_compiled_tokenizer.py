"""An artifact's compiled tokenizer (kiln.text.compiled_tokenizer) gives exactly what
``tokenizers`` gives for the same tokenizer.json: ids, text, tokens, sizes, on real text (Dolly)
and on seeded random strings over awkward characters (special tokens, bytes the vocabulary has
no token for, emoji, digits, runs of spaces)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import tokenizers

from kiln import LLM, SamplingParams
from kiln.export.writer import ExportOptions, export_artifact
from kiln.text.compiled_tokenizer import (
    COMPILED_TOKENIZER_FILE,
    CompiledTokenizer,
    compile_tokenizer,
)
from kiln.text.tokenizer import Tokenizer
from kiln.weights.resolve import resolve_checkpoint

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
_AWKWARD = [
    *"aZ09 \t\n\r.,'!?-_<>|",
    *"éßñøΩжढ中文日本한",
    "\x04\x06\x13\x1d",  # bytes SmolLM2's vocabulary has no token for: dropped
    chr(0x40000) + chr(0x100000),  # 4-byte characters whose lead byte has no token either
    "\U0001f600\U0001f4a9\u200d\ufeff\u2028\xa0\u3000",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "'s",
    "'S",
    "1234567",
    "      ",
    "\n\n\n",
]


def _texts(count: int = 1500) -> list[str]:
    rows = (SHARED / "data" / "dolly" / "databricks-dolly-15k.head.jsonl").read_text().splitlines()
    texts = ["", " ", "hello", "x" * 5000, " " * 300 + "1" * 300]
    for row in rows[:200]:
        record = json.loads(row)
        texts += [record["instruction"], record["context"], record["response"]]
    rng = random.Random(0)
    texts += ["".join(rng.choices(_AWKWARD, k=rng.randint(1, 40))) for _ in range(count)]
    return texts


def _compile(backend: tokenizers.Tokenizer, tmp_path: Path) -> CompiledTokenizer:
    file, source = tmp_path / COMPILED_TOKENIZER_FILE, tmp_path / "tokenizer.json"
    source.write_text(backend.to_str(), encoding="utf-8")
    assert compile_tokenizer(backend, file) is None
    return CompiledTokenizer(file, source)


@pytest.fixture(scope="module", params=["gguf", "hugging-face-dir"])
def pair(
    request: pytest.FixtureRequest, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[tokenizers.Tokenizer, CompiledTokenizer]:
    """SmolLM2's tokenizer as its GGUF file gives it (no post-processor, a digit split before
    the byte-level one) and as its Hugging Face directory does (a template post-processor)."""
    if request.param == "gguf":
        backend = resolve_checkpoint(str(smollm2_gguf)).tokenizer
    else:
        backend = tokenizers.Tokenizer.from_file(
            str(SHARED / "models" / "smollm2-135m-instruct-gguf" / "tokenizer.json")
        )
    return backend, _compile(backend, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_tokenizers(pair, add_special_tokens: bool) -> None:
    backend, compiled = pair
    for text in _texts():
        expected = backend.encode(text, add_special_tokens=add_special_tokens).ids
        assert compiled.encode_ids(text, add_special_tokens) == expected, repr(text[:200])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_tokenizers(pair, skip_special_tokens: bool) -> None:
    backend, compiled = pair
    rng = random.Random(1)
    size = backend.get_vocab_size(with_added_tokens=True)
    sequences = [backend.encode(text).ids for text in _texts(300)]
    # Random ids cut characters in the middle (U+FFFD) and reach past the vocabulary (left out).
    sequences += [
        [rng.randrange(size + 10) for _ in range(rng.randint(0, 12))] for _ in range(3000)
    ]
    for ids in sequences:
        expected = backend.decode(ids, skip_special_tokens=skip_special_tokens)
        assert compiled.decode(ids, skip_special_tokens) == expected, ids


def test_invalid_ids_are_refused_as_tokenizers_refuses_them(pair) -> None:
    backend, compiled = pair
    for ids, error in (([-1], OverflowError), ([1 << 40], OverflowError), ([1.5], TypeError)):
        with pytest.raises(error):
            backend.decode(ids)
        with pytest.raises(error):
            compiled.decode(ids)


def test_tokens_and_sizes_match_tokenizers(pair) -> None:
    backend, compiled = pair
    size = backend.get_vocab_size(with_added_tokens=True)
    assert [compiled.id_to_token(i) for i in range(size + 3)] == [
        backend.id_to_token(i) for i in range(size + 3)
    ]
    for with_added in (True, False):
        assert compiled.get_vocab_size(with_added) == backend.get_vocab_size(with_added)
    for token in ["<|im_start|>", "<|endoftext|>", "Ġthe", "hello", "not a token", "<kiln-piece>"]:
        assert compiled.token_to_id(token) == backend.token_to_id(token), token


@pytest.mark.parametrize("fuse_unk", [False, True])
def test_bytes_without_a_token_become_the_unknown_token_as_in_tokenizers(
    smollm2_gguf: Path, tmp_path: Path, fuse_unk: bool
) -> None:
    data = json.loads(resolve_checkpoint(str(smollm2_gguf)).tokenizer.to_str())
    data["model"]["unk_token"] = "<|endoftext|>"
    data["model"]["fuse_unk"] = fuse_unk
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    compiled = _compile(backend, tmp_path)
    for text in ["a\x04\x04b", "\x04", "x\x04 \x06\x06\x06y", *_texts(500)]:
        assert compiled.encode_ids(text) == backend.encode(text).ids, repr(text)


def test_tokenizers_it_cannot_reproduce_are_not_compiled(stories_dir: Path, tmp_path: Path) -> None:
    # stories260K: a sentencepiece-style BPE (normalizer, byte fallback), not byte-level.
    backend = tokenizers.Tokenizer.from_file(str(stories_dir / "tokenizer.json"))
    reason = compile_tokenizer(backend, tmp_path / COMPILED_TOKENIZER_FILE)
    assert reason is not None and "byte fallback" in reason
    assert not (tmp_path / COMPILED_TOKENIZER_FILE).exists()


def test_tokenizer_on_the_compiled_form_behaves_as_on_tokenizers(tmp_path: Path) -> None:
    directory = SHARED / "models" / "smollm2-135m-instruct-gguf"
    config = json.loads((directory / "tokenizer_config.json").read_text())
    parsed = Tokenizer(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")), config)
    compiled = Tokenizer(_compile(parsed.backend, tmp_path), config)
    text = "<|im_start|>user\nWhat is 12345 + 6789?<|im_end|>\n  naïve café 😀"
    assert compiled._prepared is None  # nothing parsed tokenizer.json yet
    assert compiled.encode(text) == parsed.encode(text)
    assert compiled.encode_chat(text) == parsed.encode_chat(text)
    ids = parsed.encode(text)
    assert compiled.decode(ids) == parsed.decode(ids)
    assert compiled.decode(ids, skip_special_tokens=False) == parsed.decode(ids, False)
    assert compiled.convert_ids_to_tokens(ids) == parsed.convert_ids_to_tokens(ids)
    assert (compiled.vocab_size, compiled.all_special_ids, compiled.eos_token_id) == (
        parsed.vocab_size,
        parsed.all_special_ids,
        parsed.eos_token_id,
    )
    assert compiled._prepared is None
    # Offsets come from tokenizer.json, parsed on first use.
    assert compiled.encode_with_offsets(text) == parsed.encode_with_offsets(text)
    assert compiled._prepared is not None


def test_an_artifact_loads_its_compiled_tokenizer_or_else_parses(
    smollm2_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifact = tmp_path / "artifact"
    export_artifact(str(smollm2_gguf), artifact, ExportOptions(1, 256, "fp32", None, "cpu"))
    prompt, params = "The capital of France is", SamplingParams(temperature=0.0, max_new_tokens=8)

    def run() -> tuple[bool, list[int], str]:
        llm = LLM(str(artifact))
        output = llm.generate(prompt, params)[0]
        return llm.tokenizer._compiled is not None, output.token_ids, output.text

    compiled, ids, text = run()
    assert compiled and text
    # A file of another format (a later kiln's, or damaged): a warning, then tokenizer.json.
    (artifact / COMPILED_TOKENIZER_FILE).write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with caplog.at_level(logging.WARNING):
        assert run() == (False, ids, text)
    assert "parsing tokenizer.json instead" in caplog.text
    (artifact / COMPILED_TOKENIZER_FILE).unlink()
    assert run() == (False, ids, text)
