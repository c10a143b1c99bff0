"""A throwaway PostgreSQL server for tests: ``initdb`` into a temporary folder, ``pg_ctl
start`` on a free loopback port, one fresh database per test, ``pg_ctl stop`` and the folder
removed at the end.

The binaries are found on PATH (``pg_ctl``, and ``initdb`` beside it once symlinks are
followed) or in Debian's ``/usr/lib/postgresql/VERSION/bin`` (``apt-get install
postgresql``, as ``.ci/run`` does). PostgreSQL refuses to run as root: as root, the server runs
as the ``postgres`` user (made by Debian's package) through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "kiln"
RUN_AS = "postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server could be started here (the message says why)."""


def binaries() -> Path:
    """The folder holding initdb and pg_ctl."""
    found = shutil.which("pg_ctl")
    if found is not None:
        folder = Path(os.path.realpath(found)).parent
        if (folder / "initdb").is_file():
            return folder
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if versions:
        return Path(versions[-1]).parent
    raise PostgresUnavailableError(
        "no PostgreSQL binaries (pg_ctl, initdb): apt-get install -y postgresql (.ci/run does)"
    )


@dataclass
class PostgresServer:
    port: int
    folder: Path
    bin: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True
        ) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError as e:
        raise PostgresUnavailableError(
            f"running as root, and there is no {RUN_AS!r} user to run PostgreSQL as "
            "(Debian's postgresql package makes it)"
        ) from e
    return ["runuser", "-u", RUN_AS, "--", *command]


def _run(command: list[str], log: Path) -> None:
    try:
        done = subprocess.run(
            _as_server_user(command), capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:  # runuser missing, a hung server...
        raise PostgresUnavailableError(f"{Path(command[0]).name}: {e}") from e
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        raise PostgresUnavailableError(
            f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()}\n{tail}"
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    folder_bin = binaries()
    # NOTE: not pytest's tmp_path: it lies under a root-only folder the server user cannot
    # enter.
    folder = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    try:
        if os.geteuid() == 0:
            _as_server_user(["true"])  # the user exists, or say so
            shutil.chown(folder, user=RUN_AS)
        data, log, port = folder / "data", folder / "server.log", free_port()
        _run(
            [
                str(folder_bin / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            log,
        )
        options = (
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = [str(folder_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options]
        _run([*start, "-w", "-t", "60", "start"], log)
        try:
            yield PostgresServer(port, folder, folder_bin)
        finally:
            _run([str(folder_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
