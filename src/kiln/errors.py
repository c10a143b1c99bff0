"""Errors kiln raises on purpose, each with a message a user can act on.

One hierarchy for the whole package: each class is a kind of failure a caller can act on, and
``server/errors.py`` maps each class (not each message) to an HTTP status in one table.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class: anything kiln reports to a user as a one-line message.

    ``param`` names the request field at fault, ``code`` is a machine-readable reason
    (``context_length_exceeded``, ``model_not_found``...); APIs that have such fields (OpenAI's
    ``param`` and ``code``) report them.
    """

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ConfigError(KilnError, ValueError):
    """A setting (engine, server, models config) is out of range or inconsistent."""


class ModelLoadError(KilnError):
    """A checkpoint could not be found, read, or does not match what kiln expects."""


class InvalidRequestError(KilnError, ValueError):
    """A request (prompt, sampling parameters, chat messages) is not valid."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus requested output) does not fit the model's context."""


class OverloadedError(KilnError):
    """More work than the server takes at once (seats or queue full): retry later."""


class UnavailableError(KilnError):
    """Nothing can serve the request right now (engine stopped, no model loaded, a model switch
    taking too long): retry later, ``retry_after`` seconds from now."""

    retry_after: int = 1


class NotFoundError(KilnError, LookupError):
    """The request names something that does not exist (a model, a conversation)."""


class ConflictError(KilnError):
    """The request conflicts with work under way (a switch to another model)."""


class EngineFailureError(KilnError):
    """The engine failed while generating a request that had been accepted."""


class WorkerFailedError(EngineFailureError):
    """A tensor-parallel worker process died or failed: the engine cannot run another step."""
