"""The public API: load a preset (or paths), chat or complete, change knobs between calls.

>>> from eft_local import load_session
>>> s = load_session()                      # the default preset from models.toml
>>> for chunk in s.chat("Where was Tova Brint born?"):
...     print(chunk.text, end="")
>>> s.generate("Tova Brint was born in", beta=1.5, temperature=0).text   # this call only
>>> s.set_param("beta", 1.5)                # the session's default from now on

Every call takes its settings (:class:`eft_local.settings.Settings`: formula, knobs,
sampling, stops) as one frozen value or as keyword changes to :attr:`Session.defaults`;
nothing a call is given outlives it. The CLI and the server use only this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from eft_local import backend, hub, speculative, structured, utf8
from eft_local.chat import (
    FALLBACK_TEMPLATE,
    Conversation,
    fit_messages,
    special_pattern,
    tokenize_messages,
)
from eft_local.config import (
    Config,
    Preset,
    default_conservative_role,
    load_config,
    preset_from_paths,
)
from eft_local.engine import Engine, Model, Step
from eft_local.errors import ContextFull, EftError
from eft_local.formula import Formula
from eft_local.loading import LoadOptions, check_models, load_models, quantize
from eft_local.remote.http import traffic_summary
from eft_local.sampler import SamplerSettings
from eft_local.schedule import tuning
from eft_local.scoring import Score, score_tokens
from eft_local.settings import Settings
from eft_local.text import TextStream
from eft_local.vocab import AlignmentReport

Progress = Callable[[str], None]
"""Where a session reports while it loads. Lines that start with ``warning:`` or ``note:``
are notices (:func:`is_notice`); the others (which file loads, the schedule chosen) are
details that the CLI prints only with ``--verbose``."""

__all__ = ["Chunk", "LoadOptions", "Result", "SamplerSettings", "Score", "Session",
           "Settings", "Step", "check_models", "is_notice", "load_session", "quantize"]


def is_notice(message: str) -> bool:
    """True for progress lines people should see by default (warnings and notes)."""
    return message.startswith(("warning:", "note:"))


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
    (moved, not evaluated again; see :meth:`Session.stream`)."""


@dataclass(frozen=True)
class Result:
    """A finished generation."""

    text: str
    finish: str
    prompt_tokens: int
    steps: list[Step] = field(default_factory=list)


class Session:
    """Models loaded for one preset, a conversation, and the default settings of calls."""

    def __init__(self, preset: Preset, *, params: Mapping[str, float] | None = None,
                 sampling: SamplerSettings | None = None, options: LoadOptions | None = None,
                 progress: Progress | None = None,
                 models: Mapping[str, Model] | None = None,
                 report: AlignmentReport | None = None) -> None:
        self.preset = preset
        self.defaults = Settings(formula=preset.formula, params=preset.params,
                                 sampling=sampling or SamplerSettings()
                                 ).replace(params=params or {})
        """The settings of every call that gives none (see :meth:`settings_for`)."""
        self.options = options or LoadOptions()
        say = progress or (lambda _msg: None)
        if models is None:
            paths = {role: hub.resolve(spec, download=self.options.download)
                     for role, spec in preset.models.items() if not spec.remote}
            report = check_models(preset, download=self.options.download, say=say)
            if not report.ok:
                raise EftError(f"preset {preset.name!r}: models do not share a token space: "
                               f"{report.summary()}")
            models = load_models(preset, paths, self.options, say)
        elif report is None:
            raise EftError("pass the alignment report together with pre-loaded models")
        self.report = report
        self.models = dict(models)
        self.engine = Engine(self.models, template_role=preset.template_role,
                             conservative_role=self.conservative_role(), allowed=report.allowed,
                             parallel=self.options.parallel, n_threads=self.options.n_threads)
        self.tuning: tuning.Tuning | None = None
        """How the decode schedule was chosen (None: named, not measured)."""
        self.schedule_reason = ""
        """Why this decode schedule, in words (/stats)."""
        self._set_schedule(say)
        ref = self.models[preset.template_role]
        self.template = (preset.chat_template or getattr(ref, "chat_template", lambda: None)()
                         or FALLBACK_TEMPLATE)
        self.conversation = Conversation()
        self._specials: re.Pattern[str] | bool | None = None
        self._pieces: utf8.Pieces | None = None
        self._longest: int | None = None
        self._speculator: speculative.Speculator | None = None
        whole = [r for r, m in self.models.items() if not getattr(m, "partial_rewind", True)]
        self.can_speculate = not whole
        """False when a model cannot roll back part of its cache (recurrent or hybrid):
        every rejected draft would evaluate its whole context again, so decoding is plain."""
        if whole and self.options.speculative:
            say(f"note: {', '.join(whole)} cannot roll back part of its cache (recurrent or "
                "hybrid model): speculative decoding is off")

    # -- loading --------------------------------------------------------------------------
    def _set_schedule(self, say: Progress) -> None:
        """The decode schedule: measured (cached per machine and model set) or named."""
        name = self.options.schedule or ("auto" if self.options.parallel else "sequential")
        self.tuning, self.schedule_reason = tuning.choose(
            self.engine, name, parallel=self.options.parallel, say=say)

    def close(self) -> None:
        """Free every model."""
        self.engine.close()
        for model in self.models.values():
            close = getattr(model, "close", None)
            if close:
                close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- settings -------------------------------------------------------------------------
    @property
    def formula(self) -> Formula:
        """The default formula."""
        return self.defaults.formula

    @property
    def params(self) -> dict[str, float]:
        """The default knob values (``beta``, ``lam``)."""
        return dict(self.defaults.params)

    @property
    def sampling(self) -> SamplerSettings:
        """The default sampler settings."""
        return self.defaults.sampling

    def update(self, **changes: object) -> None:
        """Change the defaults of later calls (any keyword of :meth:`Settings.replace`)."""
        self.defaults = self.defaults.replace(**changes)

    def set_param(self, name: str, value: float) -> None:
        """Set a formula parameter (``beta`` or ``lam``/``lambda``) for later calls."""
        self.defaults = self.defaults.replace(params={name: value})

    def set_sampling(self, **changes: object) -> None:
        """Change sampler settings (temperature, top_p, top_k, min_p, seed, ...) for later
        calls."""
        try:
            sampling = replace(self.sampling, **changes)  # type: ignore[arg-type]
        except TypeError as exc:
            raise EftError(f"unknown sampler setting: {exc}") from None
        self.defaults = self.defaults.replace(sampling=sampling)

    def settings_for(self, settings: Settings | None = None, **changes: object) -> Settings:
        """The settings of one call: ``settings`` (default :attr:`defaults`) with
        ``changes`` (any keyword of :meth:`Settings.replace`)."""
        base = self.defaults if settings is None else settings
        return base.replace(**changes) if changes else base

    def weights(self, settings: Settings | None = None) -> np.ndarray:
        """Formula weights (default settings unless given), in the engine's role order."""
        w = (settings or self.defaults).weights()
        return np.array([w.get(role, 0.0) for role in self.engine.roles], dtype=np.float32)

    def describe(self, settings: Settings | None = None) -> str:
        """The formula with numbers filled in."""
        return (settings or self.defaults).describe()

    # -- roles ----------------------------------------------------------------------------
    def conservative_role(self, settings: Settings | None = None) -> str:
        """Whose top-p set conservative decoding keeps: the preset's conservative_role, else
        the formula's fine-tuned model under the knobs of ``settings``."""
        s = settings or self.defaults
        return self.preset.conservative_role or default_conservative_role(s.formula, s.params)

    def draft_role(self, settings: Settings | None = None) -> str:
        """The model that drafts: the preset's draft_role, else the cheapest model (smallest
        file) with a non-zero weight under the knobs of ``settings``."""
        return self.preset.draft_role or self.engine.cheapest_role(
            self.weights(settings), prefer=self.conservative_role(settings))

    @property
    def speculator(self) -> speculative.Speculator:
        """This session's speculator, made once (its adaptive block size lasts across
        turns) and again when ``options.draft_k`` or the preset's draft role changes."""
        k, role = self.options.draft_k, self.preset.draft_role
        spec = self._speculator
        if spec is None or spec.draft_k != k or spec.draft_role != role:
            spec = self._speculator = speculative.Speculator(self.engine, draft_k=k,
                                                             draft_role=role)
            t = self.tuning
            if t is not None:  # start from the costs measured at load, not from a guess
                drafter = self.draft_role()
                spec.seed(drafter=drafter, step=t.measured, verify=t.verify_costs(drafter),
                          draft_step=t.costs[drafter][max(t.costs[drafter])])
        return spec

    def roles(self, settings: Settings | None = None) -> dict[str, str]:
        """What each role does: template, draft and conservative reference."""
        return {"template": self.preset.template_role, "draft": self.draft_role(settings),
                "conservative": self.conservative_role(settings)}

    # -- prompts --------------------------------------------------------------------------
    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], *,
                    parse_special: bool | None = None,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Render ``messages`` (and ``tools``, OpenAI's function cards) with the chat
        template and tokenize them.

        Tool cards, assistant ``tool_calls`` and ``tool`` messages go to the template where
        it renders them, else into plain messages (:func:`eft_local.structured.tool_messages`).

        The template's own text is tokenized with special-token parsing; the messages'
        content is not, so a control token's text typed in a message (``<|im_end|>``...)
        stays plain text and cannot fake a turn. ``parse_special`` (default: that of
        :attr:`defaults`) parses it too: the raw behaviour, for trusted input only.
        BOS comes first when the model asks for it (``add_bos``) and the template did not
        write it.
        """
        vocab = self.report.vocabs.get(self.preset.template_role)
        special = self.defaults.parse_special if parse_special is None else parse_special
        if not special and self._specials is None:
            self._specials = special_pattern(vocab) or False
        messages, cards = structured.tool_messages(self.template, messages, tools)
        tokens = tokenize_messages(self.template, messages,
                                   self.models[self.preset.template_role], vocab,
                                   specials=None if special else self._specials or None,
                                   tools=cards)
        if vocab and vocab.add_bos and vocab.bos >= 0 and tokens[:1] != [vocab.bos]:
            return [vocab.bos, *tokens]
        return tokens

    def special_count(self, text: str) -> int:
        """How many control-token texts (``<|im_end|>``...) ``text`` holds: with special-token
        parsing, that many tokens at least (and llama.cpp's parsing costs their number times
        the text's length: count before tokenizing untrusted text)."""
        if self._specials is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            self._specials = special_pattern(vocab) or False
        return sum(1 for _ in self._specials.finditer(text)) if self._specials else 0

    @property
    def longest_token(self) -> int:
        """The most bytes a token's text has: a text of N characters is at least N / this
        many tokens (a check that needs no tokenizing)."""
        if self._longest is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            self._longest = max((len(t) for t in vocab.texts), default=1) if vocab else 1
        return max(1, self._longest)

    def tokenize(self, text: str, *, add_bos: bool = True, parse_special: bool = False
                 ) -> list[int]:
        """Tokenize plain text with the template model's tokenizer: BOS first when
        ``add_bos`` and the vocabulary asks for it; control-token text parsed as control
        tokens only with ``parse_special``."""
        return self.models[self.preset.template_role].tokenize(text, add_bos=add_bos,
                                                               special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (control tokens as their text), UTF-8 decoded as a whole."""
        ref = self.models[self.preset.template_role]
        n_vocab = ref.n_vocab
        bad = next((t for t in tokens if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < n_vocab), None)
        if bad is not None:
            raise EftError(f"token id {bad!r} is outside the vocabulary (0..{n_vocab - 1})")
        return b"".join(ref.piece(t, special=True) for t in tokens).decode("utf-8", "replace")

    def raw_tokens(self, prompt: str) -> list[int]:
        """Tokenize plain text (BOS added if the model's vocabulary asks for it)."""
        return self.models[self.preset.template_role].tokenize(prompt, add_bos=True,
                                                               special=False)

    # -- generation -----------------------------------------------------------------------
    def stream(self, tokens: list[int], *, settings: Settings | None = None,
               max_tokens: int = 512, diagnostics: bool = False, top_n: int | None = None,
               shift: bool = False, **changes: object) -> Iterator[Chunk]:
        """Generate after ``tokens`` with ``settings`` (default :attr:`defaults`, changed by
        ``changes``: ``beta=1.5``, ``temperature=0``, ``stop=[...]``...); yields text
        chunks, the last one carries ``finish``.

        ``top_n`` (0 or more) gives each step its log-prob under the mix (temperature 1, no
        filters, no grammar: as :meth:`score` defines it) and the ``top_n`` most likely
        tokens there. A ``grammar`` (or ``json_schema``) restricts every step to the tokens
        it allows (the end of generation only where it is complete). ``shift``: ``tokens``
        are the cached conversation with its oldest turns dropped (:meth:`fit_chat`);
        models that can shift their caches move the kept tokens down where that is faster
        than evaluating them again (:func:`eft_local.kvshift.worth_shifting`), which gives
        slightly different log-probs from a fresh prompt."""
        s = self.settings_for(settings, **changes)
        if max_tokens < 1:
            raise EftError(f"invalid max_tokens {max_tokens}: must be >= 1")
        ref = self.models[self.preset.template_role]
        grammar = self.grammar(s.grammar) if s.grammar else None
        text = TextStream(s.stop)
        finish = "length"
        weights = self.weights(s)
        conservative = self.conservative_role(s)
        generate = self.engine.generate
        if (self.options.speculative and self.can_speculate
                and speculative.worth_speculating(self.engine, weights, self.draft_role(s))):
            generate = self.speculator.generate
        before, shifted = self.engine.stats.prefilled, self.engine.stats.shifted
        steps = generate(tokens, weights, s.sampling, max_tokens=max_tokens,
                         diagnostics=diagnostics, top_n=top_n, conservative=conservative,
                         shift=shift, grammar=grammar)
        try:
            for step in steps:
                piece = b"" if ref.is_eog(step.token) else ref.piece(step.token)
                yield Chunk(text=text.push(piece), step=step)
                finish = step.finish or finish
                if text.stopped:
                    finish = "stop"
                    break
        finally:
            steps.close()
        tail = text.flush()  # may apply a stop string that waited for an earlier, longer one
        yield Chunk(text=tail, finish="stop" if text.stopped else finish,
                    evaluated=self.engine.stats.prefilled - before,
                    shifted=self.engine.stats.shifted - shifted)

    def grammar(self, text: str) -> utf8.Guarded:
        """A fresh state of the GBNF grammar ``text`` over the template model's vocabulary,
        which also keeps the text well-formed UTF-8 (:mod:`eft_local.utf8`)."""
        ref = self.models[self.preset.template_role]
        if not isinstance(ref, backend.LlamaModel):
            raise EftError("grammars need models loaded by llama.cpp")
        if self._pieces is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            self._pieces = utf8.Pieces([ref.piece(t) for t in range(self.vocab_size)],
                                       [t for t in (vocab.eog if vocab else ())
                                        if t < self.vocab_size])
        return utf8.Guarded(backend.Grammar(ref, text), utf8.Utf8Guard(self._pieces))

    def prompt_tokens(self, prompt: str, *, raw: bool = True, system: str | None = None,
                      parse_special: bool | None = None) -> list[int]:
        """Tokens for a one-off prompt: ``raw`` text as is, else one chat turn."""
        if raw:
            return self.raw_tokens(prompt)
        conv = Conversation(system=system, turns=[{"role": "user", "content": prompt}])
        return self.chat_tokens(conv.messages(), parse_special=parse_special)

    def complete(self, prompt: str, *, raw: bool = True, system: str | None = None,
                 settings: Settings | None = None, **kwargs: object) -> Iterator[Chunk]:
        """One-off generation: ``raw`` continues the text, else it is a single chat turn
        (keywords as :meth:`stream`)."""
        s = self.settings_for(settings, **_changes(kwargs))
        tokens = self.prompt_tokens(prompt, raw=raw, system=system,
                                    parse_special=s.parse_special)
        call = {k: v for k, v in kwargs.items() if k in _CALL}
        return self.stream(tokens, settings=s, **call)  # type: ignore[arg-type]

    def generate(self, prompt: str, *, raw: bool = True, system: str | None = None,
                 **kwargs: object) -> Result:
        """Like :meth:`complete`, collected into a :class:`Result`."""
        out, steps, finish = [], [], "length"
        for chunk in self.complete(prompt, raw=raw, system=system, **kwargs):
            out.append(chunk.text)
            if chunk.step:
                steps.append(chunk.step)
            if chunk.finish:
                finish = chunk.finish
        return Result(text="".join(out), finish=finish, prompt_tokens=steps[0].position,
                      steps=steps)

    def fit_chat(self, messages: list[dict[str, Any]], *, settings: Settings | None = None,
                 max_tokens: int = 512, tools: Sequence[Mapping[str, Any]] | None = None
                 ) -> tuple[list[int], list[dict[str, Any]], int]:
        """The prompt of ``messages`` (and ``tools``, as :meth:`chat_tokens`) under the
        context policy of ``settings`` (default :attr:`defaults`): ``(tokens, messages
        kept, messages dropped)``.

        ``truncate`` drops the oldest whole turns (system messages and the newest message
        stay) until a reply of ``min(max_tokens, n_ctx / 4)`` tokens fits after the prompt;
        when the newest message needs more, the reply gets the room left. ``error`` keeps
        every message. Either way a prompt that leaves no room for one token is a
        :class:`~eft_local.errors.ContextFull` error.
        """
        s = settings or self.defaults
        n_ctx = self.engine.n_ctx
        rendered: dict[int, list[int]] = {}

        def count(msgs: list[dict[str, str]]) -> int:
            rendered[len(msgs)] = found = self.chat_tokens(msgs, parse_special=s.parse_special,
                                                           tools=tools)
            return len(found)

        if s.context_overflow == "error":
            need = count(messages)
            if need >= n_ctx:
                raise ContextFull(f"the conversation needs {need} tokens but the context holds "
                                  f"{n_ctx}; drop older turns (context overflow 'truncate') "
                                  "or raise n_ctx")
            return rendered[len(messages)], list(messages), 0

        def chars(msgs: list[dict[str, Any]]) -> int:
            return sum(len(m["content"]) for m in msgs if isinstance(m.get("content"), str))

        reserve = min(max_tokens, n_ctx // 4)
        most = self.longest_token  # first what the characters alone decide (N characters:
        try:  # N / most tokens at least), so that a long history is never tokenized whole
            fewer, gone = fit_messages(messages, chars, (n_ctx - reserve) * most,
                                       limit=(n_ctx - 1) * most)
        except ContextFull:  # too long even alone: tokenized alone, for the error's count
            fewer, gone = fit_messages(messages, chars, 0, limit=chars(messages))
        kept, dropped = fit_messages(fewer, count, n_ctx - reserve, limit=n_ctx - 1)
        tokens = rendered.get(len(kept)) or self.chat_tokens(kept, parse_special=s.parse_special,
                                                             tools=tools)
        return tokens, kept, gone + dropped

    def chat(self, message: str, *, settings: Settings | None = None, max_tokens: int = 512,
             diagnostics: bool = False, **changes: object) -> Iterator[Chunk]:
        """Add a user turn, stream the reply, and keep it in the history.

        When the history no longer fits, the context policy of the settings decides
        (:meth:`fit_chat`): ``truncate`` (the default) drops the oldest exchanges (the system
        prompt stays; a chunk with a ``notice`` says so the first time in a conversation,
        :attr:`Conversation.dropped` counts them), ``error`` raises
        :class:`~eft_local.errors.ContextFull`. An interrupted reply is kept as far as it
        got; a turn that fails leaves the history exactly as it was.
        """
        s = self.settings_for(settings, **changes)
        conv = self.conversation
        before, dropped_before = list(conv.turns), conv.dropped
        conv.add("user", message)
        try:
            tokens, _kept, dropped = self.fit_chat(conv.messages(), settings=s,
                                                   max_tokens=max_tokens)
            exchanges = conv.drop(dropped)
        except BaseException:
            conv.turns[:], conv.dropped = before, dropped_before
            raise
        reply: list[str] = []
        try:
            if dropped and not dropped_before:
                yield Chunk(notice=f"the conversation is longer than the context "
                            f"({self.engine.n_ctx} tokens): its oldest turns are dropped from "
                            f"now on ({exchanges} exchange(s) this time)")
            for chunk in self.stream(tokens, settings=s, max_tokens=max_tokens,
                                     diagnostics=diagnostics, shift=bool(dropped)):
                reply.append(chunk.text)
                yield chunk
        except Exception:  # a failed turn leaves the history as it was
            conv.turns[:], conv.dropped = before, dropped_before
            raise
        except BaseException:  # Ctrl-C or the caller closing early: keep the partial reply
            conv.add("assistant", "".join(reply))
            raise
        conv.add("assistant", "".join(reply))

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.conversation.turns.clear()
        self.conversation.dropped = 0

    # -- scoring --------------------------------------------------------------------------
    def score(self, text_or_tokens: str | Sequence[int], *, settings: Settings | None = None,
              top_n: int = 0, per_model: bool = False, **changes: object) -> Score:
        """Every token's log-prob under the mix (see :mod:`eft_local.scoring`).

        A string is tokenized as raw text (BOS first when the model asks for it); a token
        list is scored as is. The first token has no log-prob (nothing precedes it).
        ``top_n`` adds the most likely tokens at each position, ``per_model`` each model's
        own log-prob of the token. Uses the formula and knobs of ``settings`` (default
        :attr:`defaults`, with ``changes``); the sampler's temperature and filters do not
        apply (conservative decoding does).
        """
        s = self.settings_for(settings, **changes)
        tokens = (self.raw_tokens(text_or_tokens) if isinstance(text_or_tokens, str)
                  else list(text_or_tokens))
        result = score_tokens(self.engine, tokens, self.weights(s), s.sampling, top_n=top_n,
                              per_model=per_model, conservative=self.conservative_role(s))
        return replace(result, formula=s.describe())

    # -- introspection --------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """The context every model holds, in tokens (the smallest of them)."""
        return self.engine.n_ctx

    @property
    def vocab_size(self) -> int:
        """Token ids are ``0 .. vocab_size - 1`` (the models' common range)."""
        return self.engine.width

    def is_eog(self, token: int) -> bool:
        """True when ``token`` ends a generation (end of turn or of text)."""
        return self.engine.is_eog(token)

    def token_text(self, token: int) -> str:
        """A token's text, control tokens shown as themselves."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes, control tokens as their text."""
        return self.models[self.preset.template_role].piece(token, special=True)

    def why(self, k: int = 5, settings: Settings | None = None
            ) -> dict[str, list[tuple[str, float]]]:
        """Top-k tokens (text, probability) of each model and of the mix at the last step
        (the mix filtered by the sampler settings of ``settings``)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EftError(f"invalid k {k!r}: must be an integer >= 1")
        sampling = (settings or self.defaults).sampling
        return {name: [(self.token_text(t), p) for t, p in top]
                for name, top in self.engine.why(sampling, k).items()}

    def stats(self) -> dict[str, object]:
        """Tokens/s, time to first token, time per model and in the sampler."""
        s = self.engine.stats
        return {"generated_tokens": s.generated, "prefill_tokens": s.prefilled,
                "tokens_per_second": s.tokens_per_second(),
                "first_token_seconds": s.first_token_seconds,
                "seconds_per_model": dict(s.eval_seconds),
                "sampler_ms_per_token": 1e3 * s.sampler_seconds / max(1, s.generated),
                "shifted_tokens": s.shifted,
                "drafted_tokens": s.drafted, "accepted_tokens": s.accepted,
                "acceptance_rate": s.acceptance_rate(), **self.remote_stats(),
                **self.schedule_stats()}

    def remote_stats(self) -> dict[str, object]:
        """Network costs of the remote roles (:func:`traffic_summary`); empty without one."""
        out = traffic_summary(self.engine.stats.traffic, self.engine.stats.generated)
        return {"remote": out} if out else {}

    def schedule_stats(self) -> dict[str, object]:
        """The decode schedule and, when it was measured, its predicted and measured speed
        relative to the largest model alone at its best thread count."""
        return tuning.schedule_stats(self.engine, self.tuning, self.schedule_reason)


def load_session(preset: str | None = None, *, models: Sequence[str] = (),
                 formula: str | None = None, config: Config | None = None,
                 **kwargs: object) -> Session:
    """A session for a named preset (default from models.toml) or ``ROLE=PATH`` models."""
    if models and preset:
        raise EftError(f"give a preset ({preset!r}) or models, not both")
    if models:
        chosen = preset_from_paths(list(models), formula=formula)
    else:
        chosen = (config or load_config()).get(preset)
        if formula:
            chosen = chosen.with_formula(formula)
    return Session(chosen, **kwargs)  # type: ignore[arg-type]


_CALL = ("max_tokens", "diagnostics", "top_n")


def _changes(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The settings changes among a call's keywords (the rest shape the call itself)."""
    return {k: v for k, v in kwargs.items() if k not in _CALL}
