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
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from eft_local import backend, hub, kvshift, speculative, utf8
from eft_local.batch import Batch, Plan
from eft_local.chat import Conversation
from eft_local.engine import Engine, Model, Step
from eft_local.errors import EftError
from eft_local.formula import Formula
from eft_local.loading import LoadOptions, check_models, load_models
from eft_local.many import Batches
from eft_local.presets import (
    Config,
    Preset,
    default_conservative_role,
    load_config,
    preset_from_paths,
)
from eft_local.prompts import Prompts
from eft_local.remote.http import traffic_summary
from eft_local.request import Chunk, Generation, ReplyBytes, Request, Result, collect
from eft_local.sampler import SamplerSettings
from eft_local.schedule import tuning
from eft_local.scoring import Score, score_tokens
from eft_local.settings import Settings
from eft_local.templates import FALLBACK_TEMPLATE
from eft_local.vocab import AlignmentReport, VocabInfo

Progress = Callable[[str], None]
"""Where a session reports while it loads. Lines that start with ``warning:`` or ``note:``
are notices (:func:`is_notice`); the others (which file loads, the schedule chosen) are
details that the CLI prints only with ``--verbose``."""

__all__ = ["Chunk", "Generation", "LoadOptions", "Request", "Result", "SamplerSettings",
           "Score", "Session", "Settings", "Step", "check_models", "is_notice", "load_session",
           "quantize"]


def is_notice(message: str) -> bool:
    """True for progress lines people should see by default (warnings and notes)."""
    return message.startswith(("warning:", "note:"))


class Session(Prompts, Batches):
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
        self.check_sampling(self.defaults.sampling)
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
        self.batch = Batch(self.engine)
        """The sequences running now, one per slot (``options.n_seq`` slots)."""
        self._reply_pieces = ReplyBytes(ref)
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
        self._set_defaults(self.defaults.replace(**changes))

    def _set_defaults(self, settings: Settings) -> None:
        self.check_sampling(settings.sampling)
        self.defaults = settings

    def check_sampling(self, sampling: SamplerSettings) -> None:
        """Check ``sampling`` against this session's vocabulary (a logit bias's token ids)
        and build its penalties once (DRY's breakers as tokens)."""
        self.engine.penalties(sampling)

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
        self._set_defaults(self.defaults.replace(sampling=sampling))

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
        turns) and again when ``options.draft_k`` changes."""
        k = self.options.draft_k
        spec = self._speculator
        if spec is None or spec.draft_k != k:
            spec = self._speculator = speculative.Speculator(self.engine, draft_k=k)
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

    # -- generation -----------------------------------------------------------------------
    def prepare(self, tokens: Sequence[int], *, settings: Settings | None = None,
                max_tokens: int = 512, diagnostics: bool = False, top_n: int | None = None,
                shift: bool = False, dropped: int = 0, **changes: object) -> Request:
        """One generation after ``tokens``, prepared in one pass: its settings
        (``settings``, default :attr:`defaults`, changed by ``changes``: ``beta=1.5``,
        ``temperature=0``, ``stop=[...]``...), formula weights, roles, grammar and limits.
        Run it with :meth:`run` (or :meth:`start` beside others).

        ``top_n`` (0 or more) gives each step its log-prob under the mix (temperature 1, no
        filters, no grammar: as :meth:`score` defines it) and the ``top_n`` most likely
        tokens there. A ``grammar`` (or ``json_schema``) restricts every step to the tokens
        it allows (the end of generation only where it is complete). ``shift``: ``tokens``
        are the cached conversation with its oldest turns dropped (:meth:`fit_chat`);
        models that can shift their caches move the kept tokens down where that is faster
        than evaluating them again (:func:`eft_local.kvshift.worth_shifting`), which gives
        slightly different log-probs from a fresh prompt."""
        s = self.settings_for(settings, **changes)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise EftError(f"invalid max_tokens {max_tokens!r}: must be >= 1")
        if not tokens:
            raise EftError("empty prompt: nothing to condition on")
        if len(tokens) >= self.engine.n_ctx:
            raise EftError(f"prompt is {len(tokens)} tokens; the context holds "
                           f"{self.engine.n_ctx} (raise n_ctx or shorten the prompt)")
        self.check_sampling(s.sampling)
        weights = self.weights(s)
        drafter = self.draft_role(s)
        if not (self.options.speculative and self.can_speculate
                and speculative.worth_speculating(self.engine, weights, drafter)):
            drafter = None
        grammar = self.grammar(s.grammar).clone if s.grammar else None
        plan = Plan(tuple(int(t) for t in tokens), tuple(float(w) for w in weights),
                    s.sampling, max_tokens, self.conservative_role(s), drafter=drafter,
                    diagnostics=diagnostics, top_n=top_n, shift=shift, grammar=grammar)
        return Request(plan, s, dropped=dropped)

    def prepare_chat(self, messages: list[dict[str, Any]], *,
                     settings: Settings | None = None, max_tokens: int = 512,
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     diagnostics: bool = False, top_n: int | None = None,
                     **changes: object) -> Request:
        """A reply to ``messages`` (and ``tools``), prepared in one pass: fitted to the
        context by the settings' policy (:meth:`fit_chat`; the request says how many
        messages it dropped), rendered and tokenized once, then as :meth:`prepare`."""
        s = self.settings_for(settings, **changes)
        tokens, _kept, dropped = self.fit_chat(messages, settings=s, max_tokens=max_tokens,
                                               tools=tools)
        return self.prepare(tokens, settings=s, max_tokens=max_tokens,
                            diagnostics=diagnostics, top_n=top_n, shift=bool(dropped),
                            dropped=dropped)

    def start(self, request: Request, *, slot: int | None = None,
              cancelled: threading.Event | None = None, share: Generation | None = None
              ) -> Generation:
        """Start ``request`` in a free slot (default: the one whose caches share the
        longest prefix with its prompt, :meth:`Batch.choose_slot`); it runs with every
        :meth:`step`. An :class:`~eft_local.errors.EftError` when every slot is taken.
        ``cancelled``: an event that stops its grammar work once set; ``share``: a running
        generation of the same prompt, whose cached prompt this one copies."""
        self.batch.speculator = self.speculator
        seq = self.batch.add(request.plan, slot=slot, cancelled=cancelled,
                             share=share.seq if share is not None else None)
        return Generation(request, seq, self.batch, self._reply_pieces)

    def step(self) -> list[tuple[Generation, list[Chunk]]]:
        """One step of every running generation: each one's new chunks (a finished
        generation's last chunk carries its finish; it has left its slot)."""
        out: dict[Generation, list[Chunk]] = {}
        for seq, step in self.batch.step():
            gen = seq.owner
            if not isinstance(gen, Generation) or gen.finish is not None:
                continue
            if step is None:  # its own step failed: gen.error says why
                gen.fail(seq.error)  # type: ignore[arg-type]
                out.setdefault(gen, [])
            else:
                out.setdefault(gen, []).extend(gen.chunks(step))
        return list(out.items())

    def running(self) -> list[Generation]:
        """The generations in their slots."""
        return [s.owner for s in self.batch.running if isinstance(s.owner, Generation)]

    def run(self, request: Request, *, slot: int | None = None) -> Iterator[Chunk]:
        """Run ``request`` to its end, streaming its chunks; the last carries ``finish``."""
        gen = self.start(request, slot=slot)
        try:
            while gen.finish is None:
                for other, chunks in self.step():
                    if other is gen:
                        yield from chunks
            if gen.error is not None:
                raise gen.error
        finally:
            gen.cancel()

    def stream(self, tokens: list[int], *, settings: Settings | None = None,
               max_tokens: int = 512, diagnostics: bool = False, top_n: int | None = None,
               shift: bool = False, **changes: object) -> Iterator[Chunk]:
        """:meth:`prepare` and :meth:`run` in one: generate after ``tokens``; yields text
        chunks, the last one carries ``finish``."""
        return self.run(self.prepare(tokens, settings=settings, max_tokens=max_tokens,
                                     diagnostics=diagnostics, top_n=top_n, shift=shift,
                                     **changes))

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
        chunks = list(self.complete(prompt, raw=raw, system=system, **kwargs))
        first = next((c.step for c in chunks if c.step is not None), None)
        return collect(chunks, first.position if first is not None else 0)

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
            request = self.prepare_chat(conv.messages(), settings=s, max_tokens=max_tokens,
                                        diagnostics=diagnostics)
            exchanges = conv.drop(request.dropped)
        except BaseException:
            conv.turns[:], conv.dropped = before, dropped_before
            raise
        reply: list[str] = []
        try:
            if request.dropped and not dropped_before:
                yield Chunk(notice=f"the conversation is longer than the context "
                            f"({self.engine.n_ctx} tokens): its oldest turns are dropped from "
                            f"now on ({exchanges} exchange(s) this time)")
            for chunk in self.run(request, slot=0):
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
              top_n: int = 0, per_model: bool = False, slot: int | None = None,
              **changes: object) -> Score:
        """Every token's log-prob under the mix (see :mod:`eft_local.scoring`).

        A string is tokenized as raw text (BOS first when the model asks for it); a token
        list is scored as is. The first token has no log-prob (nothing precedes it).
        ``top_n`` adds the most likely tokens at each position, ``per_model`` each model's
        own log-prob of the token. Uses the formula and knobs of ``settings`` (default
        :attr:`defaults`, with ``changes``); the sampler's temperature and filters do not
        apply (conservative decoding does). The text is evaluated in a free ``slot``
        (default: the one sharing the longest prefix with it).
        """
        s = self.settings_for(settings, **changes)
        tokens = (self.raw_tokens(text_or_tokens) if isinstance(text_or_tokens, str)
                  else list(text_or_tokens))
        slot = self.batch.choose_slot(tokens) if slot is None else slot
        if slot is None or slot not in self.free_slots():
            raise EftError(f"no free slot to score in (all {len(self.batch.slots)} run)")
        self.batch.touch(slot)
        result = score_tokens(self.engine, tokens, self.weights(s), s.sampling, top_n=top_n,
                              per_model=per_model, conservative=self.conservative_role(s),
                              seq=slot)
        return replace(result, formula=s.describe())

    # -- slots ----------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        """Slots (KV sequences of every model) that no generation runs in."""
        return self.batch.free_slots()

    def held(self, role: str, slot: int = 0) -> list[int]:
        """The tokens ``role``'s cache holds in ``slot``."""
        return list(self.engine.held(role, slot))

    def role_vocab(self, role: str) -> tuple[VocabInfo, list[bytes], dict[int, bytes]]:
        """``role``'s vocabulary as its file gives it, each id's piece (control tokens as
        their text) and the pieces that differ without special tokens (what ``/eft/vocab``
        serves)."""
        model = self.models[role]
        read = getattr(model, "vocab", None)
        vocab = read() if callable(read) else self.report.vocabs[role]
        pieces = [model.piece(i, special=True) for i in range(vocab.n_tokens)]
        plain = {i: p for i in range(vocab.n_tokens) if (p := model.piece(i)) != pieces[i]}
        return vocab, pieces, plain

    def model_rows(self, role: str, tokens: Sequence[int], first: int, *,
                   slot: int | None = None) -> tuple[np.ndarray, int]:
        """One model's logit rows at positions ``first .. len(tokens) - 1`` of ``tokens``
        (row i predicts token i + 1) in a free ``slot`` (default: the one sharing the
        longest prefix), re-using the prefix its cache holds there; and how many positions
        were re-used. Positions before ``first`` that must be evaluated get no rows."""
        model = self.models[role]
        tokens = [int(t) for t in tokens]
        bad = next((t for t in tokens if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            raise EftError(f"token id {bad} is outside the vocabulary "
                           f"(0..{model.n_vocab - 1})")
        if not 0 <= first < len(tokens):
            raise EftError(f"first row {first} is outside the {len(tokens)} positions")
        if len(tokens) > model.n_ctx:
            raise EftError(f"{len(tokens)} tokens do not fit the context ({model.n_ctx})")
        slot = self.batch.choose_slot(tokens) if slot is None else slot
        if slot is None or slot not in self.free_slots():
            raise EftError("no free slot for the rows")
        self.batch.touch(slot)
        keep = min(kvshift.common_prefix(self.engine.held(role, slot), tokens), first)
        if first > keep:
            self.engine.evaluate_role(role, keep, tokens[keep:first], seq=slot)
            keep_evaluated = first
        else:
            keep_evaluated = keep
        wanted = len(tokens) - first
        rows = self.engine.evaluate_role(role, keep_evaluated, tokens[first:],
                                         all_logits=wanted > 1, seq=slot, whole=True)
        return rows[-wanted:], keep

    # -- introspection --------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """The context every model holds, in tokens (the smallest of them)."""
        return self.engine.n_ctx

    def is_eog(self, token: int) -> bool:
        """True when ``token`` ends a generation (end of turn or of text)."""
        return self.engine.is_eog(token)

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
                "acceptance_rate": s.acceptance_rate(), "slots": len(self.batch.slots),
                "running": len(self.batch.running),
                "kv_bytes_per_slot": {r: int(getattr(m, "kv_bytes_per_seq", 0))
                                      for r, m in self.models.items()},
                **self.remote_stats(),
                **self.schedule_stats()}

    def remote_stats(self) -> dict[str, object]:
        """Network costs of the remote roles (:func:`traffic_summary`); empty without one."""
        out = traffic_summary(self.engine.stats.traffic, self.engine.stats.generated)
        return {"remote": out} if out else {}

    def schedule_stats(self) -> dict[str, object]:
        """The decode schedule and, when it was measured, its predicted and measured speed
        relative to the largest model alone at its best thread count."""
        return tuning.schedule_stats(self.engine, self.tuning, self.schedule_reason)


def quantize(source: str | Path, output: str | Path, kind: str, *,
             allow_requantize: bool = False, n_threads: int = 0) -> Path:
    """Write a quantized copy of a GGUF file with llama.cpp's quantizer (``kind``: Q8_0,
    Q5_K_M, Q4_K_M, Q4_0, f16...); the output appears only when complete."""
    return backend.quantize_gguf(source, output, kind, n_threads,
                                 allow_requantize=allow_requantize)


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
