"""MultiprocExecutor: tensor parallelism over worker processes kiln starts, watches and stops.

``tp`` ranks are spawned (``torch.multiprocessing``, spawn: CUDA and OpenMP state never cross
a fork), meet at a ``file://`` rendezvous (gloo on the CPU, NCCL on CUDA) and each loads its
shard (:mod:`kiln.engine.worker`). Every step's plain-data ``SchedulerOutput`` goes down a pipe
to every rank; rank 0 sends back the ``ModelOutput`` it sampled from the gathered logits.

While it waits, the executor watches every rank: a rank that dies or reports an error fails
the step with :class:`WorkerFailedError` (and every later one: a missing rank cannot be
replaced), and the other ranks are stopped, so no process is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from kiln.config import ConfigError, EngineArgs, ModelConfig
from kiln.engine.executor import Executor
from kiln.engine.io import ModelOutput, SchedulerOutput
from kiln.engine.worker import (
    AllocateCache,
    CallResult,
    RankCall,
    ShardLoaded,
    Shutdown,
    WorkerFailure,
    WorkerReady,
    WorkerSpec,
    run_worker,
)
from kiln.errors import KilnError, WorkerFailedError
from kiln.parallel.shard import check_tp_degree

logger = logging.getLogger(__name__)

JOIN_SECONDS = 5.0
"""How long a rank gets to leave cleanly at shutdown before it is terminated."""


class MultiprocExecutor(Executor):
    """``args.tp`` worker processes, one rank each; blocks until every rank has loaded."""

    def __init__(
        self,
        args: EngineArgs,
        checkpoint_path: str,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        from_artifact: bool = False,
    ) -> None:
        """``checkpoint_path``: a checkpoint each rank reads its part of, or with
        ``from_artifact`` an artifact exported for ``args.tp`` ranks (each loads its file)."""
        tp = args.tp
        check_tp_degree(config, tp)
        devices = _rank_devices(device, tp)
        self._device = devices[0]
        self._block_size = args.block_size
        self._error: str | None = None
        self._graceful = [True]  # False once a rank failed: the others are not waited for
        self._rendezvous = tempfile.mkdtemp(prefix="kiln-tp-")
        ctx = mp.get_context("spawn")
        self._processes: list[Any] = []
        self._conns: list[Connection] = []
        # NOTE: the finalizer holds the lists, not the executor: workers are stopped when an
        # engine is dropped without shutdown() (a model unloaded by the server) and at exit.
        self._finalizer = weakref.finalize(
            self, _stop, self._processes, self._conns, self._rendezvous, self._graceful
        )
        threads = max(1, torch.get_num_threads() // tp) if device.type == "cpu" else 1
        for rank in range(tp):
            spec = WorkerSpec(
                rank=rank,
                world_size=tp,
                init_method=f"file://{self._rendezvous}/store",
                checkpoint_path=checkpoint_path,
                args=args,
                config=config,
                dtype=dtype,
                device=str(devices[rank]),
                max_model_len=max_model_len,
                eos_token_ids=eos_token_ids,
                num_threads=threads,
                parent_pid=os.getpid(),
                from_artifact=from_artifact,
            )
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(
                target=run_worker, args=(spec, child_conn), name=f"kiln-tp-{rank}", daemon=True
            )
            with _main_module_hidden():
                process.start()
            child_conn.close()  # the child holds its end: EOF here means the child is gone
            self._processes.append(process)
            self._conns.append(parent_conn)
        try:
            loaded = self._receive(range(tp), ShardLoaded)
            self.num_blocks = min(m.num_blocks for m in loaded.values())
            self._send_all(AllocateCache(self.num_blocks))
            self._receive(range(tp), WorkerReady)
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, rank order."""
        return [p.pid for p in self._processes]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def block_size(self) -> int:
        return self._block_size

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        self._send_all(scheduler_output)
        return self._receive([0], ModelOutput)[0]

    def collective_rpc(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(runner, *args)`` on every rank (``fn`` must pickle by reference: a module-level
        function); their results in rank order."""
        self._send_all(RankCall(fn, args))
        results = self._receive(range(len(self._processes)), CallResult)
        return [results[r].value for r in range(len(self._processes))]

    def shutdown(self) -> None:
        """Ask every rank to leave, wait, terminate the ones that do not (idempotent)."""
        if self._error is None:
            self._error = "it was shut down"
        self._finalizer()

    def _send_all(self, message: Any) -> None:
        self._check_alive()
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self._fail(f"tensor-parallel rank {rank} is gone ({self._exit_status(rank)})")

    def _receive(self, ranks: Sequence[int], kind: type) -> dict[int, Any]:
        """One ``kind`` message from each of ``ranks``, while watching every rank: any other
        message, a failure report, a closed pipe or an exited process fails the executor."""
        pending = set(ranks)
        results: dict[int, Any] = {}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._processes)}
        conns = {id(c): rank for rank, c in enumerate(self._conns)}
        while pending:
            for ready in wait([*self._conns, *sentinels]):
                if not isinstance(ready, Connection):
                    rank = sentinels[ready]
                    # A rank may exit right after reporting why: read that first.
                    if self._conns[rank].poll():
                        ready = self._conns[rank]
                    else:
                        self._fail(f"tensor-parallel rank {rank} died ({self._exit_status(rank)})")
                rank = conns[id(ready)]
                try:
                    message = ready.recv()
                except (EOFError, OSError):
                    self._fail(f"tensor-parallel rank {rank} died ({self._exit_status(rank)})")
                if isinstance(message, WorkerFailure):
                    self._fail_with(message)
                if rank not in pending or not isinstance(message, kind):
                    self._fail(f"tensor-parallel rank {rank} sent {type(message).__name__}")
                results[rank] = message
                pending.discard(rank)
        return results

    def _check_alive(self) -> None:
        if self._error is not None:
            raise WorkerFailedError(f"the tensor-parallel engine has failed: {self._error}")

    def _exit_status(self, rank: int) -> str:
        process = self._processes[rank]
        process.join(0.5)  # a dying process may need a moment to be reaped
        code = process.exitcode
        if code is None:
            return f"pid {process.pid}, no longer answering"
        if code < 0:
            return f"pid {process.pid}, killed by signal {-code}"
        return f"pid {process.pid}, exit code {code}"

    def _fail_with(self, failure: WorkerFailure) -> None:
        logger.error("tensor-parallel rank %d failed:\n%s", failure.rank, failure.traceback)
        if isinstance(failure.error, KilnError) and self._error is None:
            # A load error (bad checkpoint, out of memory...) is the user's to act on: as is.
            self._error = f"rank {failure.rank}: {failure.error}"
            self._graceful[0] = False
            self.shutdown()
            raise failure.error
        last_line = failure.traceback.strip().splitlines()[-1] if failure.traceback else "?"
        self._fail(f"tensor-parallel rank {failure.rank} failed: {last_line}")

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
            logger.error("%s; stopping every rank", reason)
        self._graceful[0] = False
        self.shutdown()
        raise WorkerFailedError(f"the tensor-parallel engine has failed: {self._error}")


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a spawned process without it re-running the parent's ``__main__``.

    NOTE: spawn re-imports the parent's main script in the child so that objects defined there
    unpickle; a worker needs none (its target and messages live in kiln), and a script calling
    ``LLM(tp=2)`` without an ``if __name__ == "__main__"`` guard would start ranks forever.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    for key in saved:
        setattr(main, key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _rank_devices(device: torch.device, tp: int) -> list[torch.device]:
    if device.type != "cuda":
        return [device] * tp
    available = torch.cuda.device_count()
    first = device.index or 0
    if first + tp > available:
        raise ConfigError(f"tp={tp} needs {tp} GPUs from cuda:{first}; {available} visible")
    return [torch.device("cuda", first + rank) for rank in range(tp)]


def _stop(
    processes: list[Any], conns: list[Connection], rendezvous: str, graceful: list[bool]
) -> None:
    """Stop every rank: ask, wait, terminate, kill (a failed engine's ranks may be stuck in a
    collective with a dead peer: they are terminated at once)."""
    for conn in conns:
        with contextlib.suppress(OSError, EOFError, ValueError):  # that rank is gone already
            conn.send(Shutdown())
    for process in processes:
        process.join(JOIN_SECONDS if graceful[0] else 0)
        if process.is_alive():
            process.terminate()
            process.join(JOIN_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(rendezvous, ignore_errors=True)
