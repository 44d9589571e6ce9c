"""``serve-synthetic``: the installed entry point; the program is :func:`tensorcom.cli.synthetic_server.serve_synthetic`."""

from __future__ import annotations

from tensorcom.cli.synthetic_server import serve_synthetic as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
