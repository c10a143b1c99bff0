"""One tensor-parallel rank: a worker process that loads its shard, holds its KV cache and runs
every step the executor sends it (:mod:`kiln.engine.multiproc_executor` starts and stops it).

Messages cross a pipe as plain picklable objects: the main process sends
:class:`AllocateCache`, then each step's ``SchedulerOutput`` (or a :class:`RankCall`), then
:class:`Shutdown`; rank 0 answers each step with the ``ModelOutput`` it sampled, and any rank
answers a failure with :class:`WorkerFailure` before it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from kiln.config import EngineArgs, ModelConfig
from kiln.config.engine import DEFAULT_CPU_KV_CACHE_MEMORY
from kiln.engine.io import ModelOutput
from kiln.engine.kv_cache import allocate_kv_cache, num_kv_blocks
from kiln.engine.runner import ModelRunner, RequestState
from kiln.errors import ModelLoadError
from kiln.export.reader import open_artifact
from kiln.models.base import CausalLM
from kiln.models.loader import prepare_for_inference
from kiln.parallel.group import TensorParallelGroup
from kiln.parallel.shard import load_rank_model, rank_config, tie_head
from kiln.weights.resolve import resolve_checkpoint

PARENT_POLL_SECONDS = 0.5
"""How often a worker checks that the process that started it is still there."""
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for a peer before failing (a hung rank, not a slow step)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank needs to load its shard (picklable: it crosses to the spawned process)."""

    rank: int
    world_size: int
    init_method: str
    """``file://`` rendezvous the ranks meet at (a fresh file per engine)."""
    checkpoint_path: str
    args: EngineArgs
    config: ModelConfig
    dtype: torch.dtype
    device: str
    max_model_len: int
    eos_token_ids: frozenset[int]
    num_threads: int
    parent_pid: int
    from_artifact: bool = False
    """``checkpoint_path`` is an artifact exported for this degree: the rank reads its own
    pre-sharded file instead of slicing a checkpoint."""


@dataclass(frozen=True)
class ShardLoaded:
    """A rank loaded its shard; ``num_blocks`` is how many KV blocks its memory holds."""

    rank: int
    num_blocks: int


@dataclass(frozen=True)
class AllocateCache:
    """Allocate this many KV blocks (the fewest any rank can hold) and get ready to run."""

    num_blocks: int


@dataclass(frozen=True)
class WorkerReady:
    rank: int


@dataclass(frozen=True)
class RankCall:
    """Run ``fn(runner, *args)`` on every rank and send back its result (tools, tests)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class CallResult:
    rank: int
    value: Any


@dataclass(frozen=True)
class WorkerFailure:
    """A rank failed: the exception (when it pickles) and its formatted traceback."""

    rank: int
    error: BaseException | None
    traceback: str


@dataclass(frozen=True)
class Shutdown:
    """Leave the process group and exit."""


class RankRunner(ModelRunner):
    """A rank's :class:`ModelRunner`: every rank computes the same step on its shard, rank 0
    samples from the gathered logits and broadcasts the tokens, so each rank's copy of every
    request (its next input token) stays the same as rank 0's."""

    def __init__(self, *args: Any, group: TensorParallelGroup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def _sample(self, logits: torch.Tensor, sampled: list[RequestState]) -> ModelOutput:
        if self.group.rank == 0:
            output = super()._sample(logits, sampled)
            self.group.broadcast_ints(output.token_ids, self.device)
            return output
        token_ids = self.group.broadcast_ints([0] * len(sampled), self.device)
        for state, token_id in zip(sampled, token_ids, strict=True):
            state.output_token_ids.append(token_id)
        self.penalties.append([s.penalty_slot for s in sampled], token_ids)
        return ModelOutput(request_ids=[s.request_id for s in sampled], token_ids=token_ids)


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """A rank's process: load, then serve the executor's messages until :class:`Shutdown`.

    Any failure is sent to the executor (which then stops every rank) before exiting; a worker
    whose parent is gone exits on its own, so none is left behind even after a ``kill -9``.
    """
    # NOTE: Ctrl-C in a terminal reaches the whole process group; the parent decides when a
    # rank stops (``kiln serve`` finishes its requests first), or the parent watch below does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_exit_without_parent, args=(spec.parent_pid,), name="kiln-parent-watch", daemon=True
    ).start()
    try:
        runner = _start(spec, conn)
        while True:
            message = conn.recv()
            if isinstance(message, Shutdown):
                break
            if isinstance(message, RankCall):
                conn.send(CallResult(spec.rank, message.fn(runner, *message.args)))
                continue
            output = runner.execute(message)
            if spec.rank == 0:
                conn.send(output)
    except (EOFError, KeyboardInterrupt):
        pass  # the executor is gone (or the terminal's Ctrl-C reached the whole group)
    except BaseException as e:  # every failure is reported, then the rank exits
        _report(conn, spec.rank, e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _start(spec: WorkerSpec, conn: Connection) -> RankRunner:
    torch.set_num_threads(spec.num_threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        # NOTE: gloo otherwise picks its interface from the host name, which need not resolve
        # in a container; every rank runs on this machine.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    group = TensorParallelGroup(spec.rank, spec.world_size)
    model = load_shard(spec, group, device)
    if spec.args.warm_up:
        model.warm_up(spec.args.max_num_batched_tokens, spec.args.max_num_seqs)
    config = rank_config(spec.config, spec.world_size)
    conn.send(ShardLoaded(spec.rank, _num_blocks(spec, config, device)))
    message = conn.recv()
    if not isinstance(message, AllocateCache):
        raise RuntimeError(f"expected AllocateCache, got {type(message).__name__}")
    kv_caches = allocate_kv_cache(
        config, message.num_blocks, spec.args.block_size, spec.dtype, device
    )
    runner = RankRunner(
        model, kv_caches, spec.args.block_size, device, spec.eos_token_ids, group=group
    )
    conn.send(WorkerReady(spec.rank))
    return runner


def load_shard(spec: WorkerSpec, group: TensorParallelGroup, device: torch.device) -> CausalLM:
    """This rank's shard, built on the CPU (untouched storage costs no memory there), then moved
    to ``device``: from an exported artifact, the rank's own file as stored; from a checkpoint,
    the rank's part of each tensor (:func:`load_rank_model`, which ``kiln export --tp`` uses
    too, so both hold the same bytes)."""
    if spec.from_artifact:
        artifact = open_artifact(spec.checkpoint_path)
        if artifact is None:  # replaced since the executor looked at it
            raise ModelLoadError(f"{spec.checkpoint_path}: no longer a kiln artifact")
        model = artifact.build_rank_model(spec.config, group)
    else:
        checkpoint = resolve_checkpoint(spec.checkpoint_path)
        model = load_rank_model(checkpoint, spec.config, spec.dtype, group, spec.max_model_len)
    model.to(device)
    tie_head(model, group)  # after the move: a tied head shares the embedding's storage
    return prepare_for_inference(model, device)


def _num_blocks(spec: WorkerSpec, config: ModelConfig, device: torch.device) -> int:
    """KV blocks this rank can hold. On the CPU the ranks share one memory, so the budget
    (``kv_cache_memory``, or the CPU default) is split between them; on a GPU each rank sizes
    its cache from its own device's free memory or the per-device ``kv_cache_memory``."""
    cache_config = spec.args.cache_config()
    if device.type == "cpu":
        budget = cache_config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        cache_config = dataclasses.replace(cache_config, kv_cache_memory=budget // spec.world_size)
    return num_kv_blocks(config, cache_config, spec.dtype, device)


def _report(conn: Connection, rank: int, error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    try:
        conn.send(WorkerFailure(rank, error, text))
    except Exception:  # an error that does not pickle still gets its text out
        with contextlib.suppress(OSError, EOFError):  # the executor is gone: nobody to tell
            conn.send(WorkerFailure(rank, None, text))


def _exit_without_parent(parent_pid: int) -> None:
    """Exit the moment the parent is gone (killed, or crashed past its own clean-up): the
    worker is re-parented, and a rank left alone would wait in a collective forever."""
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(1)
