"""The exceptions tensorcom raises.

Every exception derives from :class:`TensorcomError` and from the built-in exception it resembles, so callers can
catch either ``tensorcom.DecodeError`` or plain ``ValueError``. Messages show the offending value and what was
expected; CLIs print them as one line with :attr:`TensorcomError.exit_code`.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "PipelineError",
    "ProtocolError",
    "RemoteError",
    "SecurityError",
    "StateError",
    "TensorcomError",
    "Timeout",
    "URLError",
    "WorkerError",
]


class TensorcomError(Exception):
    """Base class of every error tensorcom raises on purpose."""

    exit_code: int = 1


class DecodeError(TensorcomError, ValueError):
    """Bytes on the wire or in a file are not a valid ``.ten`` encoding."""

    exit_code = 3


class URLError(TensorcomError, ValueError):
    """A tensorcom URL could not be parsed or expanded."""

    exit_code = 2


class ConfigError(TensorcomError, ValueError):
    """An argument or option has a value that cannot work."""

    exit_code = 2


class Timeout(TensorcomError, TimeoutError):
    """Nothing arrived (or could be sent) within the configured time."""

    exit_code = 4


class ProtocolError(TensorcomError, ValueError):
    """A peer sent a message that does not follow the tensorcom protocol."""

    exit_code = 3


class SecurityError(TensorcomError, PermissionError):
    """A peer refused our keys, or a connection's security settings do not match its peer's (CURVE or plain)."""

    exit_code = 5


class StateError(TensorcomError, ValueError):
    """A saved state does not match the pipeline or connection it is loaded into."""

    exit_code = 2


class PipelineError(TensorcomError, RuntimeError):
    """A pipeline stage failed; the message names the stage and, where known, the input index."""


class WorkerError(PipelineError):
    """A worker process raised or died while computing an item."""


class RemoteError(TensorcomError, RuntimeError):
    """A server reported an error while computing a batch for this client."""
