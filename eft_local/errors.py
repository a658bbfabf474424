"""The one exception type users see: a one-line message that says what and where."""


class EftError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
