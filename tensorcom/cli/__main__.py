"""``python -m tensorcom.cli``: the ``tensorcom`` command."""

from tensorcom.cli import main

main()
