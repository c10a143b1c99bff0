"""Errors kiln raises on purpose, each with a message a user can act on."""


class KilnError(Exception):
    """Base class: anything kiln reports to a user as a one-line message."""


class ModelLoadError(KilnError):
    """A checkpoint could not be found, read, or does not match what kiln expects."""


class InvalidRequestError(KilnError, ValueError):
    """A request (prompt, sampling parameters, chat messages) is not valid."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus requested output) does not fit the model's context."""
