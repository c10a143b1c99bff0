"""llama.cpp's ``llama-server``, the served peer of ``kiln bench cpu``: find it, build it, run it.

llama.cpp is a benchmark-only peer: kiln neither ships nor needs it. The ``llama-cpp-python``
package the benchmark compares against in process is installed already; its source
distribution carries the matching llama.cpp sources under ``vendor/llama.cpp``, so the server
is built from exactly that llama.cpp version, once, into a cache directory::

    $KILN_CACHE_DIR/llama-server/<llama-cpp-python version>/   (default ~/.cache/kiln/...)
        llama-server                           the binary (llama.cpp linked in statically)
        build.log                              cmake's output of the last build
        llama_cpp_python-<version>.tar.gz      the sdist and the unpacked sources and build
        work/                                  tree: kept until a build succeeds, so that a
                                               failed or interrupted one resumes

The build takes 10-30 minutes on 2 cores and runs at the lowest CPU priority. Never run it
in tests or CI.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import kiln

PACKAGE = "llama-cpp-python"
BINARY = "llama-server"

# Static (one self-contained binary to copy), CPU-native, and nothing that reaches the network
# or needs libraries beyond a compiler: no curl/openssl (model downloads, HTTPS), no web UI
# assets. Flags an older or newer llama.cpp does not know are only a cmake warning.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)

Log = Callable[[str], None]


class LlamaServerUnavailable(RuntimeError):
    """No llama-server could be found or built; the message says why."""


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """kiln's cache directory: ``$KILN_CACHE_DIR``, else ``~/.cache/kiln``."""
    environ = os.environ if environ is None else environ
    given = environ.get("KILN_CACHE_DIR")
    return Path(given).expanduser() if given else Path.home() / ".cache" / "kiln"


def server_dir(version: str, root: Path) -> Path:
    """Where the llama-server built from llama-cpp-python ``version`` lives."""
    return root / "llama-server" / version


def cached_binary(directory: Path) -> Path | None:
    """The finished binary in ``directory``, if a build put one there."""
    binary = directory / BINARY
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def cached_sdist(directory: Path, version: str) -> Path | None:
    """A source distribution of ``version`` downloaded by an earlier (maybe failed) build."""
    for name in (f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LlamaServerUnavailable(
            f"{PACKAGE} is not installed, so there is no llama.cpp version to build"
        ) from None


def find_or_build(
    explicit: str | None = None,
    root: Path | None = None,
    version: str | None = None,
    log: Log = print,
) -> Path:
    """The llama-server binary to benchmark: ``explicit`` if given, else the cached build of
    llama-cpp-python ``version``'s llama.cpp (default: the installed one's) under ``root``
    (default: :func:`cache_root`), building it first if there is none.

    Raises :class:`LlamaServerUnavailable` with the reason when there is no binary to run.
    """
    if explicit is not None:
        binary = Path(explicit).expanduser()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise LlamaServerUnavailable(f"--llama-server {explicit}: not an executable file")
        return binary
    version = version or installed_version()
    directory = server_dir(version, cache_root() if root is None else root)
    binary = cached_binary(directory)
    if binary is not None:
        return binary
    return build(version, directory, log)


def build(version: str, directory: Path, log: Log = print) -> Path:
    """Download llama-cpp-python ``version``'s sdist, build its vendored llama.cpp's
    llama-server, and put the binary in ``directory``."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise LlamaServerUnavailable(f"cannot build llama-server: {', '.join(missing)} not found")
    directory.mkdir(parents=True, exist_ok=True)
    log(f"llama-server: none cached in {directory}; building it from {PACKAGE}=={version}")
    log("llama-server: this is done once and takes 10-30 minutes on 2 cores")
    sdist = cached_sdist(directory, version) or download_sdist(version, directory, log)
    work = directory / "work"
    source = unpack(sdist, work, log) / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise LlamaServerUnavailable(f"{sdist.name} has no vendor/llama.cpp to build")
    build_dir = work / "build"
    jobs = str(min(2, os.cpu_count() or 1))
    log_path = directory / "build.log"
    with log_path.open("w") as build_log:
        log(f"llama-server: cmake configure (log: {log_path})")
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], build_log)
        log(f"llama-server: cmake --build --target {BINARY} -j {jobs} (the long part)")
        _run(["cmake", "--build", str(build_dir), "--target", BINARY, "-j", jobs], build_log)
    built = next((p for p in build_dir.rglob(BINARY) if p.is_file()), None)
    if built is None:
        raise LlamaServerUnavailable(f"the build finished without a {BINARY}; see {log_path}")
    # Copy under a temporary name and rename, so that an interrupted copy never looks like a
    # finished binary to the next run.
    partial = directory / f".{BINARY}.partial"
    shutil.copy2(built, partial)
    partial.rename(directory / BINARY)
    # Only the binary stays: the sources and the sdist are ~1 GB and 75 MB.
    shutil.rmtree(work, ignore_errors=True)
    sdist.unlink(missing_ok=True)
    log(f"llama-server: built {directory / BINARY}")
    return directory / BINARY


def download_sdist(version: str, directory: Path, log: Log = print) -> Path:
    log(f"llama-server: pip download {PACKAGE}=={version} (source distribution)")
    with tempfile.TemporaryDirectory(prefix="kiln-llama-sdist-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{PACKAGE}=={version}",
            "-d",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not tarballs:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise LlamaServerUnavailable(
                f"pip download of the {PACKAGE} sdist failed: {' / '.join(tail)}"
            )
        target = directory / tarballs[0].name
        shutil.move(tarballs[0], target)
    return target


def unpack(sdist: Path, work: Path, log: Log = print) -> Path:
    """The sdist's top directory under ``work``, unpacked unless an earlier try did it."""
    top = work / sdist.name.removesuffix(".tar.gz")
    if (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return top
    log(f"llama-server: unpacking {sdist.name}")
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        # The "data" filter (no absolute paths, links out of the tree...) where this Python
        # has it (3.10.12+, 3.11.4+).
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work, filter="data")
        else:
            tar.extractall(work)
    return top


def _run(command: list[str], log_file: object) -> None:
    """Run a build step at the lowest CPU priority (a one-off build must not slow down
    whatever else shares the machine), its output to the build log."""
    done = subprocess.run(
        command,
        stdout=log_file,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.nice(19),
    )
    if done.returncode != 0:
        name = getattr(log_file, "name", "the build log")
        raise LlamaServerUnavailable(
            f"`{' '.join(command[:3])} ...` failed (exit {done.returncode}); see {name}"
        )


def server_command(
    binary: Path,
    model: Path,
    port: int,
    threads: int,
    slots: int,
    slot_context: int,
    repack: bool = True,
) -> list[str]:
    """llama-server serving ``model`` on loopback ``port`` with ``slots`` parallel sequences.

    llama-server splits ``-c`` evenly among its slots, so the total context is
    ``slots x slot_context``. ``-tb`` too: prompt processing uses the same threads as decode,
    as in kiln. ``repack=False``: ``--no-repack`` (see :func:`kiln.bench.cpu.load_llama_cpp`).
    """
    command = [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(slots * slot_context),
    ]
    return command if repack else [*command, "--no-repack"]


def peer_environment() -> dict[str, str]:
    """This process's environment without what ``import kiln`` set for kiln's own threads
    (GOMP_SPINCOUNT): a peer server runs with its defaults."""
    environment = dict(os.environ)
    if kiln.SETS_OPENMP_SPIN:
        environment.pop("GOMP_SPINCOUNT", None)
    return environment


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def launched(command: Sequence[str], port: int, name: str, timeout: float = 300.0) -> Iterator[str]:
    """Run a server process until the block ends; yields its base URL once ``/health`` answers
    200 (both llama-server and ``kiln serve`` answer 503 or refuse while the model loads).

    Its output goes to a temporary log whose tail is shown if it dies before it is ready.
    """
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+", errors="replace") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=peer_environment()
        )
        try:
            _wait_healthy(process, url, timeout, name, output)
            yield url
        finally:
            _stop(process)


def _wait_healthy(
    process: subprocess.Popen[bytes], url: str, timeout: float, name: str, output: object
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output.seek(0)  # type: ignore[attr-defined]
            tail = output.read()[-2000:]  # type: ignore[attr-defined]
            raise LlamaServerUnavailable(
                f"{name} exited with {process.returncode} before it was ready:\n{tail}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise LlamaServerUnavailable(f"{name} was not ready after {timeout:.0f} s")


def _stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    # `python -m kiln.bench.llama_server`: build (or find) the cached binary and print its path.
    try:
        print(find_or_build())
    except LlamaServerUnavailable as e:
        sys.exit(f"llama-server unavailable: {e}")
