"""``python -m eft_local`` is the ``eft-local`` command."""

from eft_local.cli.main import main

main()
