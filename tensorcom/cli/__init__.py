"""The command-line programs and the click glue they share.

- :mod:`~tensorcom.cli.options`: errors as one clean line, ``--version``, logging, CURVE key options, output
  paths checked before any work, the ready line.
- :mod:`~tensorcom.cli.main`: the ``tensorcom`` command (``demo``, ``serve``, ``keygen``).
- :mod:`~tensorcom.cli.image_server`: ``serve-imagenet-dir`` and ``serve-imagenet-shards``.
- :mod:`~tensorcom.cli.synthetic_server`: ``serve-synthetic``.

The top-level ``servers/`` and ``tools/`` folders hold the installed entry points. No module here loads zmq at
import time, so every program's ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

from tensorcom.cli.main import main
from tensorcom.cli.options import (
    TensorcomCommand,
    TensorcomGroup,
    check_output_path,
    client_key_options,
    echo_ready,
    server_key_options,
    setup_logging,
    stop_on_sigterm,
    version_option,
)

__all__ = [
    "TensorcomCommand",
    "TensorcomGroup",
    "check_output_path",
    "client_key_options",
    "echo_ready",
    "main",
    "server_key_options",
    "setup_logging",
    "stop_on_sigterm",
    "version_option",
]
