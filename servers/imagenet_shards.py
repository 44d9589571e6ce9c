"""``serve-imagenet-shards``: the installed entry point; the program is :func:`tensorcom.cli.image_server.serve_imagenet_shards`."""

from __future__ import annotations

from tensorcom.cli.image_server import serve_imagenet_shards as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
