"""The one exception type users see: a one-line message that says what and where."""


class EftError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""


class ContextFull(EftError):
    """A prompt or conversation that does not fit the context (the server's 400
    ``context_length_exceeded``)."""
