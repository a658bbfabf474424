"""eft-local: emulated fine-tuning on local GGUF models.

The public API lives in :mod:`eft_local.session`; see README.md for an example.
"""

from eft_local.errors import EftError

__all__ = ["EftError", "Session", "load_session"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: keep `import eft_local` cheap (no llama.cpp load)
    if name in ("Session", "load_session"):
        from eft_local import session

        return getattr(session, name)
    raise AttributeError(name)
