"""``python -m eft_local`` is the ``eft-local`` command."""

from eft_local.cli import main

main()
