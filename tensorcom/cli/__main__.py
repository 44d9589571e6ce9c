"""``python -m tensorcom.cli``: the ``tensorcom`` command."""

from tensorcom.cli.main import main

main()
