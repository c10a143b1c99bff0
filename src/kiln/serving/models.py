"""ModelManager: the models a server may serve, the one that serves, and switching between them.

The tutorials' chat-ui scheduler: a settings page lists the models, "Activate" loads another one
(about a minute for a 7B model) and "Retrieve model status" shows when it is ``available``.

One model serves at a time. A switch from ``A`` to ``B``:

1. closes the gate: requests that arrive from then on wait (up to ``switch_wait_seconds``, then
   503 with ``Retry-After``) for the switch to end, so that no request that came after the switch
   was asked for is served by ``A``;
2. loads ``B`` on a background thread (seconds to minutes: never on the event loop);
3. makes ``B`` active and opens the gate: the waiting requests go to ``B``;
4. lets the requests already running on ``A`` finish there (each request is pinned to the model
   it was admitted to, for its whole life), then stops ``A``'s engine and frees its memory.

If ``B`` fails to load it is ``failed``, with the reason; ``A`` stays active and the waiting
requests go to it.

NOTE: the memory policy (``unload_first``): loading ``B`` beside ``A`` keeps ``A``'s running
requests going during the load, but needs room for both. On a GPU there is none (each model's KV
cache takes most of the memory its weights leave free), so there ``A`` is drained and unloaded
*before* ``B`` loads, and reloaded if ``B`` fails. On CPU, both fit beside each other.

Every method runs on the server's event loop (the switch itself is an asyncio task; only the
load runs on a thread), so the active model cannot change between two reads that no ``await``
separates.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kiln.config.engine_args import EngineArgs
from kiln.engine.builder import LoadedEngine, build_engine
from kiln.errors import ConfigError, ConflictError, KilnError, NotFoundError, UnavailableError
from kiln.llm import LLM
from kiln.serving.served_model import ServedModel

logger = logging.getLogger(__name__)


class ModelStatus(str, enum.Enum):
    """Where a registered model stands (what ``GET /admin/models`` reports)."""

    AVAILABLE = "available"
    """Loaded, active and serving new requests."""
    LOADING = "loading"
    UNLOADING = "unloading"
    """No longer active: finishing the requests it was serving, then freed."""
    UNLOADED = "unloaded"
    FAILED = "failed"
    """The last load failed (``reason`` says why); activating it again retries."""


@dataclass(frozen=True)
class ModelReport:
    """One registered model as clients see it."""

    name: str
    model: str | None
    """Where it loads from (path or hub id); None for kiln's default model."""
    status: ModelStatus
    reason: str | None
    """Why the last load failed (``failed`` only)."""
    active: bool


SWITCH_RETRY_AFTER_SECONDS = 5
"""``Retry-After`` of a request refused because no model is ready."""


class ModelUnavailableError(UnavailableError):
    """No model can serve the request: a switch took longer than ``switch_wait_seconds``, or no
    model is loaded (HTTP 503 with ``Retry-After``)."""

    retry_after = SWITCH_RETRY_AFTER_SECONDS


class UnknownModelError(NotFoundError):
    """No model of that name is registered (HTTP 404)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r}")
        self.name = name


class SwitchInProgressError(ConflictError):
    """A switch to another model is under way (HTTP 409)."""


def default_name(model: str | None) -> str:
    """A model's name when none is given: the last part of its path or hub id
    (``/models/llama-3`` -> ``llama-3``, ``owner/name:file.gguf`` -> ``name``)."""
    if model is None:
        from kiln.weights.resolve import DEFAULT_MODEL

        return DEFAULT_MODEL
    base = PurePosixPath(model.rstrip("/").split(":", 1)[0]).name
    return base or model


@dataclass(frozen=True)
class ModelSpec:
    """A model the server may serve: its name and how to load it.

    Args:
        name: what clients see (``/v1/models``, ``/info``) and the admin routes take.
        model: local directory, ``.gguf`` file or hub id; None for kiln's default model.
        options: :class:`~kiln.config.engine_args.EngineArgs` fields but ``model``, e.g.
            ``dtype``; checked here, so a bad models config fails at start, not at a switch.
    """

    name: str
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip():
            raise ConfigError(f"a model name must be non-empty, not padded: {self.name!r}")
        args = EngineArgs.from_options(self.model, self.options, f"model {self.name!r}")
        object.__setattr__(self, "_args", args)

    @property
    def args(self) -> EngineArgs:
        """How to load it."""
        return self._args  # type: ignore[attr-defined]

    @classmethod
    def parse(cls, text: str, **options: Any) -> ModelSpec:
        """``NAME=MODEL``, or ``MODEL`` alone (named by :func:`default_name`)."""
        name, sep, model = text.partition("=")
        if not sep:
            name, model = default_name(text), text
        return cls(name.strip(), model.strip() or None, dict(options))

    def load(self) -> LoadedEngine:
        return build_engine(self.args)


def read_models_config(path: str | Path, **defaults: Any) -> tuple[list[ModelSpec], str | None]:
    """The specs and default model name of a models config file::

        {"models": [{"name": "llama3", "model": "/models/llama3", "dtype": "bfloat16"},
                    {"model": "/models/mistral"}],
         "default": "llama3"}

    ``name`` defaults to :func:`default_name` of ``model``; the other keys of an entry are
    :class:`~kiln.config.engine_args.EngineArgs` fields and override ``defaults``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read models config {path}: {e}") from e
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'models config {path}: expected {{"models": [{{...}}, ...]}}')
    specs = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"models config {path}: bad entry {entry!r}")
        entry = dict(entry)
        model = entry.pop("model", None)
        if model is not None and not isinstance(model, str):
            raise ConfigError(f"models config {path}: bad model {model!r}")
        name = entry.pop("name", None) or default_name(model)
        specs.append(ModelSpec(str(name), model, {**defaults, **entry}))
    default = data.get("default")
    return specs, None if default is None else str(default)


@dataclass
class _Switch:
    target: str
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ModelManager:
    """The registry of models, the active one, and switches between them.

    Args:
        specs: the models that may be served; names must be unique.
        loader: builds a spec's engine (default :meth:`ModelSpec.load`; an ``LLM`` will do
            too); runs on a thread.
        switch_wait_seconds: how long a request that arrives during a switch waits for it to
            end before a 503.
        unload_first: drain and unload the active model before loading the next (True), or
            load the next beside it (False); None: True on CUDA, False on CPU.
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        *,
        loader: Callable[[ModelSpec], LoadedEngine | LLM] | None = None,
        switch_wait_seconds: float = 30.0,
        unload_first: bool | None = None,
    ) -> None:
        if not specs:
            raise ConfigError("a server needs at least one model")
        self.specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ConfigError(
                    f"two models are named {spec.name!r}: name them apart with NAME=MODEL"
                )
            self.specs[spec.name] = spec
        if switch_wait_seconds < 0:
            raise ConfigError(f"switch_wait_seconds must be >= 0, got {switch_wait_seconds}")
        self.switch_wait_seconds = switch_wait_seconds
        self.unload_first = unload_first
        self.num_switches = 0
        """Switches completed (the next model active)."""
        self.num_failed_loads = 0
        self._loader = loader or ModelSpec.load
        self._active: ServedModel | None = None
        self._draining: list[ServedModel] = []
        self._failures: dict[str, str] = {}
        self._switch: _Switch | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # switches, and drains after them
        self._started = False

    @classmethod
    def serving(cls, model: LoadedEngine | LLM, name: str, **kwargs: Any) -> ModelManager:
        """A manager of one model, already loaded (reloaded from its source, with the options
        it was loaded with, if it is ever unloaded)."""
        loaded = model.loaded if isinstance(model, LLM) else model
        manager = cls([ModelSpec(name, loaded.name, loaded.args.options())], **kwargs)
        manager.adopt(name, loaded)
        return manager

    # --- before the server starts ---------------------------------------------------------

    def load(self, name: str | None = None) -> None:
        """Load ``name`` (default: the first model) as the active one, here and now."""
        spec = self._spec(name or next(iter(self.specs)))
        self.adopt(spec.name, self._loader(spec))

    def adopt(self, name: str, model: LoadedEngine | LLM) -> None:
        """Make an already loaded ``model`` the active model ``name``."""
        self._spec(name)
        if self._active is not None:
            raise ConfigError(f"model {self._active.name!r} is active already")
        self._active = ServedModel(name, model)
        if self._started:
            self._active.engine.start()

    # --- lifecycle (the server's lifespan) ------------------------------------------------

    def start(self) -> None:
        self._started = True
        if self._active is not None:
            self._active.engine.start()

    def stop(self) -> None:
        """Stop every engine; a switch under way is abandoned (its load thread's result is
        dropped when it ends)."""
        self._started = False
        for task in self._tasks:
            task.cancel()
        for model in [*self._draining, *([self._active] if self._active else [])]:
            engine = getattr(model, "engine", None)  # None: unloaded already
            if engine is not None:
                engine.stop()

    # --- what clients see -----------------------------------------------------------------

    @property
    def active(self) -> ServedModel | None:
        return self._active

    def current(self) -> ServedModel:
        """The active model; :class:`ModelUnavailableError` when there is none."""
        if self._active is None:
            raise ModelUnavailableError(self._unavailable_reason())
        return self._active

    @property
    def switching_to(self) -> str | None:
        return self._switch.target if self._switch is not None else None

    def status(self, name: str) -> ModelReport:
        """Its status; :class:`UnknownModelError` if unknown."""
        spec = self._spec(name)
        active = self._active is not None and self._active.name == name
        reason = None
        if self.switching_to == name:
            status = ModelStatus.LOADING
        elif active:
            status = ModelStatus.AVAILABLE
        elif any(m.name == name for m in self._draining):
            status = ModelStatus.UNLOADING
        elif name in self._failures:
            status, reason = ModelStatus.FAILED, self._failures[name]
        else:
            status = ModelStatus.UNLOADED
        return ModelReport(name, spec.model, status, reason, active)

    def statuses(self) -> list[ModelReport]:
        return [self.status(name) for name in self.specs]

    # --- requests -------------------------------------------------------------------------

    async def acquire(self) -> ServedModel:
        """Pin the active model for a request (waiting out a switch, up to
        ``switch_wait_seconds``); give it back with :meth:`release`."""
        deadline = time.monotonic() + self.switch_wait_seconds
        while self._switch is not None:
            switch = self._switch
            remaining = deadline - time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(switch.done.wait(), max(remaining, 0))
            if not switch.done.is_set():
                raise ModelUnavailableError(
                    f"switching to model {switch.target!r}: not ready after waiting "
                    f"{self.switch_wait_seconds:g} s; retry later"
                )
        # NOTE: no await from the gate check to the pin: the active model cannot change between.
        model = self.current()
        model.pin()
        return model

    def release(self, model: ServedModel) -> None:
        model.unpin()

    # --- switching ------------------------------------------------------------------------

    def activate(self, name: str) -> bool:
        """Make ``name`` the active model; True when a switch started (follow it with
        :meth:`status`), False when it is active already or a switch to it is under way.

        Raises :class:`UnknownModelError` or :class:`SwitchInProgressError`.
        """
        self._spec(name)
        if self._switch is not None:
            if self._switch.target == name:
                return False
            raise SwitchInProgressError(
                f"a switch to model {self._switch.target!r} is under way; retry when it is "
                f"{ModelStatus.AVAILABLE.value} or {ModelStatus.FAILED.value}"
            )
        if self._active is not None and self._active.name == name:
            return False
        self._switch = _Switch(name)
        self._failures.pop(name, None)
        task = asyncio.get_running_loop().create_task(self._run_switch(self._switch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run_switch(self, switch: _Switch) -> None:
        previous = self._active
        unload_first = self.unload_first
        if unload_first is None:
            unload_first = previous is not None and previous.device.type == "cuda"
        requested = switch.target
        try:
            if previous is not None and unload_first:
                await self._unload(previous)
            loaded = await self._load(requested)
            if loaded is None and previous is not None and unload_first:
                # Put back what served before, so that a bad switch does not leave none.
                switch.target = previous.name
                loaded = await self._load(previous.name)
            if loaded is not None:
                self._active = loaded
                if loaded.name == requested:
                    self.num_switches += 1
            # The gate opens: the requests that waited go to the active model.
            self._switch = None
            switch.done.set()
            if previous is not None and not unload_first and self._active is not previous:
                await self._unload(previous)
        except Exception:  # a bug; never leave the gate closed because of it
            logger.exception("switching to model %s failed", requested)
        finally:
            if self._switch is switch:
                self._switch = None
            switch.done.set()

    async def _load(self, name: str) -> ServedModel | None:
        spec = self.specs[name]
        started = time.monotonic()
        logger.info("loading model %s (%s)", name, spec.model or "default")
        try:
            model = await _on_thread(lambda: self._loader(spec), f"kiln-load-{name}")
            loaded = ServedModel(name, model)
            if self._started:
                loaded.engine.start()
        except Exception as e:
            if isinstance(e, KilnError):  # a bad path, config or device: the message says it all
                logger.error("model %s failed to load: %s", name, e)
            else:
                logger.exception("model %s failed to load", name)
            self.num_failed_loads += 1
            self._failures[name] = f"{type(e).__name__}: {e}"
            return None
        self._failures.pop(name, None)
        logger.info("model %s loaded in %.1f s", name, time.monotonic() - started)
        return loaded

    async def _unload(self, model: ServedModel) -> None:
        """Let ``model``'s pinned requests finish, then stop its engine and free its memory."""
        if self._active is model:
            self._active = None
        self._draining.append(model)
        try:
            await model.drained()
            await _on_thread(model.unload, f"kiln-unload-{model.name}")
        finally:
            self._draining.remove(model)
        logger.info("model %s unloaded", model.name)

    # --- helpers --------------------------------------------------------------------------

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownModelError(name) from None

    def _unavailable_reason(self) -> str:
        if self._switch is not None:
            return f"switching to model {self._switch.target!r}; retry later"
        failures = "; ".join(f"{n}: {r}" for n, r in self._failures.items())
        return "no model is loaded" + (f" ({failures})" if failures else "")


async def _on_thread(work: Callable[[], Any], name: str) -> Any:
    """``work()`` on a daemon thread of its own.

    NOTE: not ``asyncio.to_thread``: a load can take minutes, and a server that shuts down
    meanwhile must not wait for it (the default executor is joined at exit); its result is
    dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def post(setter: Callable[[Any], None], value: Any) -> None:
        def settle() -> None:
            if not future.done():
                setter(value)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    def run() -> None:
        try:
            result = work()
        except BaseException as e:
            post(future.set_exception, e)
        else:
            post(future.set_result, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
