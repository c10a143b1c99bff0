"""``--config FILE`` on the real `kiln` command: a YAML or JSON file of a command's flags, with
flags typed on the command line winning. Outputs are checked token for token against
``LLM.generate`` on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

# NOTE: pytest puts this directory on sys.path (rootdir-less test modules), so test_cli's
# subprocess helpers are shared rather than copied.
from test_cli import PROMPT, Run, greedy, run_many

from kiln import LLM


def test_generate_reads_a_config_and_typed_flags_win(stories_dir: Path, tmp_path: Path) -> None:
    yaml_config = tmp_path / "generate.yaml"
    yaml_config.write_text(
        f"model: {json.dumps(str(stories_dir))}\n"
        "threads: 1\n"
        f"prompt: {json.dumps(PROMPT)}\n"
        "temperature: 0\n"
        "max-new-tokens: 12\n"
    )
    json_config = tmp_path / "generate.json"
    json_config.write_text(
        json.dumps({"model": str(stories_dir), "threads": 1, "prompt": "Lily", "temperature": 0})
    )
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text(f"model: {json.dumps(str(stories_dir))}\nmax_new_tokenz: 3\n")
    from_file, overridden, from_json, bad = run_many(
        [
            Run(("generate", "--config", str(yaml_config))),
            Run(("generate", "--max-new-tokens", "5", "--config", str(yaml_config))),
            Run(("generate", "--config", str(json_config), "--max-new-tokens", "7")),
            Run(("generate", "--config", str(bad_config))),
        ]
    )
    llm = LLM(str(stories_dir))
    for result in (from_file, overridden, from_json):
        assert result.returncode == 0, result.stderr
    assert from_file.stdout == PROMPT + greedy(llm, PROMPT, 12) + "\n"
    assert overridden.stdout == PROMPT + greedy(llm, PROMPT, 5) + "\n"
    assert from_json.stdout == "Lily" + greedy(llm, "Lily", 7) + "\n"
    # A key that is no flag: a usage error naming the file and the key, before any loading.
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{bad_config}: 'max_new_tokenz' is not a flag of this command" in bad.stderr
