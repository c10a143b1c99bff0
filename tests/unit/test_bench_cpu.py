"""`kiln bench cpu`'s pure parts: statistics, the table, SSE token counting, the llama-server
cache layout. Nothing here builds or runs llama.cpp."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from kiln.bench import llama_server
from kiln.bench.cpu import (
    KILN,
    LLAMA_CPP,
    TRANSFORMERS,
    Cell,
    Row,
    StreamCount,
    completion_payload,
    format_cell,
    format_table,
    interleave,
    kiln_serve_command,
    prefill_prompts,
    ratio,
)
from kiln.cli.main import build_parser
from kiln.cli.serve import ServedModels, model_specs


def test_cell_median_and_spread() -> None:
    cell = Cell((10.0, 30.0, 12.0))
    assert cell.ok
    assert cell.median == 12.0
    assert cell.spread == (10.0, 30.0)
    assert Cell((1.0, 2.0, 3.0, 4.0)).median == 2.5


def test_cell_na_has_no_values() -> None:
    cell = Cell.na("llama-server unavailable")
    assert not cell.ok
    assert cell.reason == "llama-server unavailable"


def test_format_cell() -> None:
    assert format_cell(Cell((98.76, 101.2, 99.0))) == "99.0 (98.8-101)"
    assert format_cell(Cell((5.0,))) == "5.0 (5.0-5.0)"
    assert format_cell(Cell.na("x"), note=2) == "n/a [2]"
    assert format_cell(None) == "-"


def test_ratio_of_medians() -> None:
    row = Row("r", {KILN: Cell((30.0, 40.0, 50.0)), LLAMA_CPP: Cell((20.0, 20.0, 20.0))})
    assert ratio(row) == "2.00x"
    assert ratio(Row("r", {KILN: Cell((1.0,)), LLAMA_CPP: Cell.na("down")})) == "-"
    assert ratio(Row("r", {KILN: Cell((1.0,))})) == "-"


def test_table_aligns_columns_and_numbers_reasons() -> None:
    rows = [
        Row(
            "decode",
            {KILN: Cell((50.0, 60.0, 55.0)), LLAMA_CPP: Cell((100.0, 110.0, 105.0))},
        ),
        Row("served, 16 streams", {KILN: Cell((200.0,)), LLAMA_CPP: Cell.na("no\n  cmake")}),
        Row("served, 1 stream", {KILN: Cell((20.0,)), LLAMA_CPP: Cell.na("no cmake")}),
    ]
    lines = format_table(rows).splitlines()
    header, rule, decode, served16, served1, note = lines
    assert header.split() == ["tokens/s:", "median", "(min-max)", KILN, LLAMA_CPP, "kiln/llama.cpp"]
    # No row asked transformers: no column for it.
    assert TRANSFORMERS not in header
    assert set(rule) == {"-", " "}
    assert len({len(line) for line in (header, rule, decode)}) == 1
    assert decode.endswith("0.52x")
    assert "55.0 (50.0-60.0)" in decode
    assert "105 (100-110)" in decode
    # The same reason (once its whitespace is collapsed) is one note, referenced twice.
    assert "n/a [1]" in served16 and "n/a [1]" in served1
    assert served16.endswith("-")
    assert note == "[1] llama.cpp: no cmake"


def test_table_keeps_a_column_when_some_row_has_the_peer() -> None:
    rows = [
        Row("decode", {KILN: Cell((1.0,)), TRANSFORMERS: Cell((2.0,))}),
        Row("served", {KILN: Cell((3.0,))}),
    ]
    header, _, decode, served = format_table(rows).splitlines()
    assert header.split()[3:] == [KILN, TRANSFORMERS, "kiln/llama.cpp"]
    assert served.split()[-2:] == ["-", "-"]  # transformers not run, no ratio
    assert decode.endswith("-")  # no llama.cpp: no ratio


def test_interleave_alternates_and_drops_warmup() -> None:
    calls: list[str] = []

    def runner(name: str, value: float):
        def run() -> float:
            calls.append(name)
            return value + len(calls)

        return run

    cells = interleave({KILN: runner(KILN, 0.0), LLAMA_CPP: runner(LLAMA_CPP, 100.0)}, repeats=3)
    assert calls == [KILN, LLAMA_CPP] * 4
    assert cells[KILN].values == (3.0, 5.0, 7.0)  # the first (warm-up) run is left out
    assert cells[LLAMA_CPP].values == (104.0, 106.0, 108.0)


def test_interleave_turns_a_failing_runner_into_na() -> None:
    runs = 0

    def works() -> float:
        nonlocal runs
        runs += 1
        return 1.0

    def fails() -> float:
        raise ConnectionError("refused")

    cells = interleave({KILN: works, LLAMA_CPP: fails}, repeats=3)
    assert cells[KILN].values == (1.0, 1.0, 1.0) and runs == 4
    assert not cells[LLAMA_CPP].ok
    assert cells[LLAMA_CPP].reason == "ConnectionError: refused"


def _sse(chunk: dict) -> str:
    return "data: " + json.dumps(chunk)


def test_stream_count_prefers_usage() -> None:
    # kiln: text chunks (a chunk may carry several tokens), then a usage chunk, then [DONE].
    lines = [
        _sse({"choices": [{"index": 0, "text": "Once", "finish_reason": None}]}),
        "",
        _sse({"choices": [{"index": 0, "text": " upon a", "finish_reason": None}]}),
        _sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
        _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}),
        "data: [DONE]",
    ]
    count = StreamCount()
    for line in lines:
        count.feed(line)
    assert count.done
    assert count.text_chunks == 2
    assert count.tokens == 4


def test_stream_count_reads_usage_of_a_final_text_chunk() -> None:
    # llama-server: the last chunk carries both the finish reason and the usage.
    count = StreamCount()
    count.feed(_sse({"choices": [{"text": "a", "finish_reason": None}]}))
    count.feed(
        _sse(
            {
                "choices": [{"text": "", "finish_reason": "length"}],
                "usage": {"completion_tokens": 2},
            }
        )
    )
    assert count.tokens == 2


def test_stream_count_falls_back_to_text_chunks() -> None:
    count = StreamCount()
    for line in (": keep-alive", "event: message", *[_sse({"choices": [{"text": "x"}]})] * 3):
        count.feed(line)
    assert count.usage_tokens is None
    assert count.tokens == 3
    assert not count.done


def test_stream_count_raises_on_a_streamed_error() -> None:
    with pytest.raises(RuntimeError, match="overloaded"):
        StreamCount().feed(_sse({"error": {"message": "overloaded"}}))


def test_completion_payload_is_greedy_and_exact_length() -> None:
    payload = completion_payload("m", "p", 128)
    assert payload["max_tokens"] == 128 and payload["ignore_eos"] is True
    assert payload["temperature"] == 0.0 and payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}


def test_prefill_prompts_differ_in_the_first_token_only() -> None:
    prompts = prefill_prompts(vocab_size=1000, length=500)
    first, second = next(prompts), next(prompts)
    assert len(first) == len(second) == 500
    assert first[0] != second[0] and first[1:] == second[1:]
    assert all(100 <= t < 1000 for t in first)


def test_kiln_serve_command_passes_quantize_to_the_served_model(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    for quantize in (None, "int8"):
        command = kiln_serve_command(gguf, 8123, 2, quantize)
        assert command[1:4] == ["-m", "kiln.cli.main", "serve"]
        args = vars(build_parser().parse_args(command[3:]))
        assert args["threads"] == 2 and args["port"] == 8123
        models = ServedModels(**{k: args[k] for k in ("model", "dtype", "quantize", "device")})
        (spec,), _ = model_specs(models)
        assert spec.model == str(gguf) and spec.args.quantize == quantize


# --- llama-server cache layout ---------------------------------------------------------------


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_cache_root_follows_kiln_cache_dir(tmp_path: Path) -> None:
    assert llama_server.cache_root({"KILN_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert llama_server.cache_root({}) == Path.home() / ".cache" / "kiln"
    assert llama_server.server_dir("0.3.36", tmp_path) == tmp_path / "llama-server" / "0.3.36"


def test_cached_binary_needs_an_executable_file(tmp_path: Path) -> None:
    directory = tmp_path / "llama-server" / "1.2.3"
    assert llama_server.cached_binary(directory) is None
    directory.mkdir(parents=True)
    (directory / "llama-server").write_text("half-copied")
    (directory / "llama-server").chmod(0o644)
    assert llama_server.cached_binary(directory) is None
    _executable(directory / "llama-server")
    assert llama_server.cached_binary(directory) == directory / "llama-server"


def test_find_or_build_uses_the_cached_binary(tmp_path: Path) -> None:
    binary = _executable(llama_server.server_dir("9.9.9", tmp_path) / "llama-server")
    logged: list[str] = []
    assert llama_server.find_or_build(root=tmp_path, version="9.9.9", log=logged.append) == binary
    assert logged == []  # found, nothing built


def test_find_or_build_takes_an_explicit_binary(tmp_path: Path) -> None:
    binary = _executable(tmp_path / "bin" / "llama-server")
    assert llama_server.find_or_build(str(binary), root=tmp_path / "unused") == binary
    with pytest.raises(llama_server.LlamaServerUnavailable, match="not an executable"):
        llama_server.find_or_build(str(tmp_path / "missing"))


def test_cached_sdist_is_found_by_either_name(tmp_path: Path) -> None:
    assert llama_server.cached_sdist(tmp_path, "0.3.36") is None
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"")
    assert llama_server.cached_sdist(tmp_path, "0.3.36") == sdist
    assert llama_server.cached_sdist(tmp_path, "0.3.37") is None


def test_server_command_splits_context_over_slots(tmp_path: Path) -> None:
    command = llama_server.server_command(
        tmp_path / "llama-server", Path("m.gguf"), 9000, 2, 16, 512
    )

    def flag(name: str) -> str:
        return command[command.index(name) + 1]

    assert flag("--parallel") == "16" and flag("--ctx-size") == str(16 * 512)
    assert flag("--threads") == flag("--threads-batch") == "2"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "9000"
    assert "--no-repack" not in command


def test_server_command_without_repacking(tmp_path: Path) -> None:
    command = llama_server.server_command(
        tmp_path / "llama-server", Path("m.gguf"), 9000, 2, 16, 512, repack=False
    )
    assert command[-1] == "--no-repack" and command.count("--no-repack") == 1


def test_free_port_is_bindable() -> None:
    port = llama_server.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
