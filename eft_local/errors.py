"""The one exception type users see: a one-line message that says what and where."""


class EftError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""


class ContextFull(EftError):
    """A prompt or conversation that does not fit the context (the server's 400
    ``context_length_exceeded``)."""


class Cancelled(EftError):
    """Work stopped because its job was cancelled (:func:`eft_local.interrupts.cancel_on`):
    the server's client went away, or the server is stopping."""


def check_field(ok: bool, name: str, value: object, want: str) -> None:
    """Raise ``invalid NAME VALUE: must be WANT`` unless ``ok``."""
    if not ok:
        raise EftError(f"invalid {name} {value!r}: must be {want}")
