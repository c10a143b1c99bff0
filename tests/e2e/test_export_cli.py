"""`kiln export`, `push`, `pull`, `models ls`, then `generate` and `serve` from the pulled copy:
the real console script in subprocesses, stories260K, outputs checked token for token against
the library on the original checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kiln import LLM, SamplingParams

PROMPT = "Once upon a time"
NEW_TOKENS = 16


def kiln(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def expected(stories_dir: Path) -> str:
    llm = LLM(str(stories_dir), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    return llm.generate(PROMPT, params)[0].text


@pytest.fixture(scope="module")
def pulled(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_cli")
    exported = kiln(
        "export", "--model", str(stories_dir), "-o", str(root / "art"),
        "--batch-size", "2", "--sequence-length", "128", "--dtype", "fp32",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "sequence length 128" in exported.stdout
    (root / "registry").mkdir()
    pushed = kiln("push", str(root / "art"), f"file://{root / 'registry'}")
    assert pushed.returncode == 0, pushed.stderr
    location = pushed.stdout.strip()
    assert Path(location).parent == root / "registry"
    listed = kiln("models", "ls", "--registry", str(root / "registry"))
    assert listed.returncode == 0, listed.stderr
    assert Path(location).name in listed.stdout and "float32" in listed.stdout
    result = kiln("pull", location, str(root / "fresh"))
    assert result.returncode == 0, result.stderr
    return root / "fresh"


def test_generate_from_the_pulled_artifact(pulled: Path, expected: str) -> None:
    result = kiln(
        "generate", "--model", str(pulled), "--prompt", PROMPT,
        "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + expected + "\n"


def test_too_long_prompt_gets_the_exported_length_error(pulled: Path) -> None:
    result = kiln(
        "generate", "--model", str(pulled), "--prompt", "the big red ball " * 60,
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert result.returncode != 0
    assert "exceeds the exported sequence length 128" in result.stderr


def test_serve_the_pulled_artifact(pulled: Path, expected: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli.main", "serve", "--model", str(pulled),
         "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
        body = {"model": "fresh", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
        request = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert answer["choices"][0]["text"] == expected
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_export_with_a_registry_reuses_a_compatible_artifact(
    pulled: Path, stories_dir: Path, tmp_path: Path
) -> None:
    registry = pulled.parent / "registry"
    result = kiln(
        "export", "--model", str(stories_dir), "-o", str(tmp_path / "again"),
        "--batch-size", "1", "--sequence-length", "100", "--dtype", "fp32",
        "--registry", str(registry),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "compatible artifact found in the registry" in result.stdout
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (config["kiln"]["batch_size"], config["kiln"]["sequence_length"]) == (2, 128)
