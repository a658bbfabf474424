"""The ``eft-local`` command line: Click commands over the library (see :mod:`.main`)."""
