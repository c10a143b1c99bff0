"""`kiln bench start` end to end on stories260K: an export, then fresh processes loading the
checkpoint and the artifact, the artifact's files read from the page cache and from disk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.bench.export_start import _evict, _read_seconds
from kiln.cli.main import main

_SECONDS = r"(\d+(?:\.\d+)?(?:e-\d+)?) s  \(runs: [\d.e-]+\)"


def test_bench_start_prints_every_figure_and_ratio(
    stories_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "start", "--model", str(stories_dir), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^model: .*stories260K \| quantization: \w+ .* \| artifact: ", out, re.M)
    labels = [
        "cold start (checkpoint -> first token)",
        "warm start (artifact -> first token)",
        "cold load (checkpoint -> LLM ready)",
        "warm load (artifact -> LLM ready)",
        "read the artifact's bytes (page cache)",
        "parse its tokenizer.json (page cache)",
        "from disk: warm start",
        "from disk: warm load",
        "from disk: read the artifact's bytes",
    ]
    seconds = {}
    for label in labels:
        match = re.search(rf"^{re.escape(label)}: +{_SECONDS}$", out, re.M)
        assert match, (label, out)
        seconds[label] = float(match.group(1))
    assert all(value > 0 for value in seconds.values()), seconds
    # stories260K's tokenizer (sentencepiece-style) is not one kiln compiles: no such line.
    assert "load its compiled tokenizer" not in out
    # A first token comes after the model is loaded, in the same process.
    assert seconds["warm start (artifact -> first token)"] >= seconds[labels[3]]
    assert seconds["cold start (checkpoint -> first token)"] >= seconds[labels[2]]
    assert re.search(
        r"^cold / warm: [\d.]+x \| page cache: warm / read [\d.]+x, warm load / read [\d.]+x"
        r" \| from disk: warm / read [\d.]+x, warm load / read [\d.]+x$",
        out,
        re.M,
    )


def test_read_seconds_reads_every_file_and_evicting_keeps_the_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\1" * (3 << 20))
    (tmp_path / "b.json").write_text('{"x": 1}')
    assert _read_seconds(tmp_path) > 0
    _evict(tmp_path)  # written back and dropped from the page cache, not changed
    assert (tmp_path / "a.bin").read_bytes() == b"\1" * (3 << 20)
    assert (tmp_path / "b.json").read_text() == '{"x": 1}'


def test_tokenizer_loads_are_timed_as_a_warm_start_does_them(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    from kiln.bench.export_start import _seconds_in_fresh_process
    from kiln.export.writer import ExportOptions, export_artifact
    from kiln.text.compiled_tokenizer import COMPILED_TOKENIZER_FILE

    artifact = tmp_path / "artifact"
    export_artifact(str(smollm2_gguf), artifact, ExportOptions(1, 256, "fp32", None, "cpu"))
    assert _seconds_in_fresh_process(artifact, "tokenizer") > 0
    assert _seconds_in_fresh_process(artifact, "tokenizer.json") > 0
    # The compiled load really reads the compiled file: without it, the child fails.
    (artifact / COMPILED_TOKENIZER_FILE).unlink()
    with pytest.raises(RuntimeError, match="the timed tokenizer failed"):
        _seconds_in_fresh_process(artifact, "tokenizer")
