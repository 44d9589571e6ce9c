"""``serve-imagenet-dir``: the installed entry point; the program is :func:`tensorcom.cli.image_server.serve_imagenet_dir`."""

from __future__ import annotations

from tensorcom.cli.image_server import serve_imagenet_dir as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
