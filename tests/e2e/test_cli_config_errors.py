"""A broken config value, end to end: the real `kiln generate` in a subprocess prints one
line naming the file, the key and the value, with no traceback, and exits 2 before loading
any weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# NOTE: pytest puts this directory on sys.path (rootdir-less test modules), so test_cli's
# subprocess helpers are shared rather than copied.
from test_cli import Run, assert_one_line_error, run_many


def _broken_copy(
    stories_dir: Path, dest: Path, config: dict[str, Any], generation: dict[str, Any]
) -> Path:
    """stories260K with some config.json / generation_config.json values replaced; the other
    files are symlinks, so the copy costs nothing."""
    for source in stories_dir.iterdir():
        if source.name not in ("config.json", "generation_config.json"):
            (dest / source.name).symlink_to(source)
    for name, changes in (("config.json", config), ("generation_config.json", generation)):
        data = json.loads((stories_dir / name).read_text()) | changes
        (dest / name).write_text(json.dumps(data))
    return dest


# (config.json changes, generation_config.json changes, the message after "<dir>: ")
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "type": (
        {"num_hidden_layers": "five"},
        {},
        "config.json: num_hidden_layers must be a positive integer, got 'five'",
    ),
    "generation-eos": (
        {},
        {"eos_token_id": "x"},
        "generation_config.json: eos_token_id must be a non-negative integer or a list of them, "
        "got 'x'",
    ),
}


def test_generate_with_a_broken_config_prints_one_line_and_exits_2(
    stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dirs = {
        case: _broken_copy(stories_dir, tmp_path_factory.mktemp(case), config, generation)
        for case, (config, generation, _) in CASES.items()
    }
    dtype_dir = _broken_copy(
        stories_dir, tmp_path_factory.mktemp("dtype"), {"torch_dtype": "float128"}, {}
    )
    runs = [
        Run(("generate", "--model", str(path), "--prompt", "hi", "--threads", "1"))
        for path in [*dirs.values(), dtype_dir]
    ]
    *config_results, dtype_result = run_many(runs)  # started together: most time is imports
    for (case, path), result in zip(dirs.items(), config_results, strict=True):
        assert assert_one_line_error(result) == f"kiln: error: {path}: {CASES[case][2]}"
        assert result.stdout == ""
        assert "Loading weights" not in result.stderr  # refused before reading the weights
    # The checkpoint's dtype is only read when --dtype is auto (the default).
    assert assert_one_line_error(dtype_result) == (
        "kiln: error: config.json: torch_dtype 'float128' is not supported; "
        "use --dtype float32, bfloat16 or float16"
    )
    assert dtype_result.stdout == ""
    assert "Loading weights" not in dtype_result.stderr
