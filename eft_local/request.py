"""One generation prepared in one pass, and its text as it runs.

A :class:`Request` is what :meth:`eft_local.session.Session.prepare` (or
:meth:`~eft_local.session.Session.prepare_chat`) makes of a call: the prompt's tokens (a chat
fitted to the context and rendered once), the call's :class:`~eft_local.settings.Settings`,
and the engine's :class:`~eft_local.batch.Plan` (weights, sampler, grammar, drafter,
limits). Nothing about it is decided again while it runs. A :class:`Generation` is a request
running in the session's batch: it turns the steps of its sequence into text chunks (whole
UTF-8 characters, stop strings applied) and ends with a chunk that carries the finish.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from eft_local.batch import Batch, Plan, Sequence
from eft_local.engine import Step
from eft_local.settings import Settings
from eft_local.text import TextStream


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output: new text, the step that made it, or a notice. The last
    chunk of a generation carries ``finish`` and ``evaluated``: how many prompt tokens the
    models evaluated (the others were re-used from their caches)."""

    text: str = ""
    step: Step | None = None
    finish: str | None = None
    notice: str | None = None
    evaluated: int | None = None
    shifted: int | None = None
    """On the last chunk: prompt tokens kept by cutting dropped turns out of the caches
    (moved, not evaluated again; see :meth:`eft_local.session.Session.stream`)."""


@dataclass(frozen=True)
class Result:
    """A finished generation."""

    text: str
    finish: str
    prompt_tokens: int
    steps: list[Step] = field(default_factory=list)


def collect(chunks: Seq[Chunk], prompt_tokens: int) -> Result:
    """A generation's chunks as one :class:`Result`."""
    finish = next((c.finish for c in reversed(chunks) if c.finish), "length")
    return Result(text="".join(c.text for c in chunks), finish=finish,
                  prompt_tokens=prompt_tokens,
                  steps=[c.step for c in chunks if c.step is not None])


@dataclass(frozen=True)
class Request:
    """One generation, prepared once (see the module docstring)."""

    plan: Plan
    settings: Settings
    dropped: int = 0
    """Chat messages dropped, oldest first, to fit the context."""

    @property
    def tokens(self) -> tuple[int, ...]:
        """The prompt's tokens."""
        return self.plan.tokens


class Generation:
    """A :class:`Request` running as a sequence of a :class:`~eft_local.batch.Batch`."""

    def __init__(self, request: Request, seq: Sequence, batch: Batch, pieces: ReplyBytes) -> None:
        self.request = request
        self.seq = seq
        self.batch = batch
        self.pieces = pieces
        self.text = TextStream(request.settings.stop)
        self.finish: str | None = None
        """Why it ended (``eog``, ``length``, ``context``, ``stop``, ``cancelled``); None while
        it runs."""
        self.owner: object = None
        """Whoever runs it (the server's task)."""
        self.error: BaseException | None = None
        """Why it stopped when its own step failed (``finish`` is then ``error``)."""
        seq.owner = self

    @property
    def slot(self) -> int:
        """The slot (KV sequence of every model) it runs in."""
        return self.seq.slot

    def chunks(self, step: Step) -> list[Chunk]:
        """The chunks one step of this generation gives: its text, and after the last step
        one more chunk with the finish (the sequence has then left its slot)."""
        piece = self.pieces(step.token)
        out = [Chunk(text=self.text.push(piece), step=step)]
        if self.text.stopped:
            self.batch.remove(self.seq)
            self.finish = "stop"
        elif step.finish is not None:
            self.finish = step.finish
        if self.finish is not None:
            out.append(self._last())
        return out

    def _last(self) -> Chunk:
        tail = self.text.flush()  # may apply a stop string that waited for a longer one
        return Chunk(text=tail, finish="stop" if self.text.stopped else self.finish,
                     evaluated=self.seq.evaluated, shifted=self.seq.shifted)

    def fail(self, error: BaseException) -> None:
        """Its own step failed (its grammar): it has left its slot."""
        self.batch.remove(self.seq)
        self.error, self.finish = error, "error"

    def cancel(self) -> None:
        """Stop now (Ctrl-C, a client gone): the slot is free at once."""
        self.batch.remove(self.seq)
        if self.finish is None:
            self.finish = "cancelled"


class ReplyBytes:
    """A token's bytes in a reply: nothing for end-of-generation tokens."""

    def __init__(self, model: object) -> None:
        self.model = model

    def __call__(self, token: int) -> bytes:
        m = self.model
        return b"" if m.is_eog(token) else m.piece(token)  # type: ignore[attr-defined]
