"""ServerConfig: how `kiln serve` listens and protects itself."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings.

    Args:
        host: address to listen on.
        port: TCP port (TGI's default is 8080).
        max_concurrent_requests: requests in flight at once (queued or running); beyond it the
            server answers 429 "Model is overloaded", as TGI does.
        max_input_tokens: longest prompt accepted (default: the context minus one).
        max_total_tokens: longest prompt + max_new_tokens accepted (default: the context).
        api_key: when set, every route but /health needs ``Authorization: Bearer <key>``.
        max_body_bytes: largest request body accepted (413 beyond it).
        shutdown_timeout: seconds in-flight requests get to finish on SIGTERM.
        model_id: the name clients see (default: what --model was).
        chat_db: the web chat's store: a SQLite file or a postgresql:// URL (None: kept in
            memory, lost at shutdown).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_concurrent_requests: int = 128
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    shutdown_timeout: float = 30.0
    model_id: str | None = None
    chat_db: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_concurrent_requests < 1:
            raise ConfigError(
                f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}"
            )
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
