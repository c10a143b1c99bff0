"""`kiln serve`: the TGI- and OpenAI-compatible HTTP server."""

from __future__ import annotations

from kiln.cli.options import ModelOptions


def serve(
    model: ModelOptions,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_concurrent_requests: int = 128,
    max_input_tokens: int | None = None,
    max_total_tokens: int | None = None,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    kv_cache_memory: int | None = None,
    api_key: str | None = None,
    model_id: str | None = None,
    shutdown_timeout: float = 30.0,
) -> int:
    """Serve a model over HTTP: TGI routes (/generate, /generate_stream, /info...) and
    OpenAI routes (/v1/chat/completions, /v1/completions, /v1/models).

    Args:
        host: address to listen on.
        port: TCP port.
        max_concurrent_requests: requests in flight at once; beyond it 429 "Model is overloaded".
        max_input_tokens: longest prompt accepted (default: the context minus one).
        max_total_tokens: longest prompt + max_new_tokens accepted (default: the context).
        max_num_seqs: most requests the engine runs at once.
        max_num_batched_tokens: most tokens computed per engine step.
        kv_cache_memory: bytes for the KV cache (default: 1 GiB on CPU, 90% of free GPU memory).
        api_key: require `Authorization: Bearer KEY` on every route but /health.
        model_id: the model name clients see (default: --model).
        shutdown_timeout: seconds in-flight requests get to finish on SIGTERM.
    """
    import uvicorn

    from kiln.config.server import ServerConfig
    from kiln.server.app import create_app

    config = ServerConfig(
        host=host,
        port=port,
        max_concurrent_requests=max_concurrent_requests,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        api_key=api_key,
        shutdown_timeout=shutdown_timeout,
        model_id=model_id,
    )
    llm = model.load_with(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory=kv_cache_memory,
    )
    app = create_app(llm, config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=shutdown_timeout,
        log_level="info",
    )
    return 0
