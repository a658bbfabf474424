"""The public API: load a preset (or paths), chat or complete, change knobs between calls.

>>> from eft_local import load_session
>>> s = load_session()                      # the default preset from models.toml
>>> for chunk in s.chat("Where was Tova Brint born?"):
...     print(chunk.text, end="")
>>> s.set_param("beta", 1.5)                # stronger fine-tuning behaviour, live

The CLI uses only this module.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from eft_local import backend, hub, limits, speculative
from eft_local.chat import FALLBACK_TEMPLATE, Conversation, render
from eft_local.config import (
    Config,
    Preset,
    default_conservative_role,
    load_config,
    preset_from_paths,
)
from eft_local.engine import Engine, Model, Step, file_size
from eft_local.errors import EftError
from eft_local.formula import PARAMETERS
from eft_local.sampler import SamplerSettings
from eft_local.schedule import shapes as schedules
from eft_local.schedule import tuning
from eft_local.scoring import Score, score_tokens
from eft_local.text import TextStream
from eft_local.vocab import ATTR_CONTROL, ATTR_UNKNOWN, AlignmentReport, align

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output: new text, the step that made it, or a notice."""

    text: str = ""
    step: Step | None = None
    finish: str | None = None
    notice: str | None = None


@dataclass(frozen=True)
class Result:
    """A finished generation."""

    text: str
    finish: str
    prompt_tokens: int
    steps: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class LoadOptions:
    """Runtime-wide load defaults; a preset's per-model options win over these."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    n_batch: int = 512
    parallel: bool = True  # measured on 2 shared cores: see docs/benchmarks.md
    speculative: bool = True
    draft_k: int | None = None  # None: adaptive block size
    schedule: str | None = None
    """Decode schedule: ``auto`` (measured at load, cached; the default with ``parallel``;
    ``sequential`` unmeasured when every model is wholly on the GPU), ``lanes``,
    ``large-first`` or ``sequential`` (the default without ``parallel``)."""

    def __post_init__(self) -> None:
        if self.schedule is not None and self.schedule not in ("auto", *schedules.NAMES):
            raise EftError(f"invalid schedule {self.schedule!r}: choose auto, "
                           f"{', '.join(schedules.NAMES)}")
        if self.n_ctx is not None:
            limits.check_n_ctx(self.n_ctx, "load options")
        if self.n_threads is not None:
            limits.check_threads(self.n_threads, "load options")


def check_models(preset: Preset, *, download: bool = False) -> AlignmentReport:
    """The tokenizer-alignment report for a preset's models (vocabularies only)."""
    vocabs = {role: backend.read_vocab(hub.resolve(spec, download=download))
              for role, spec in preset.models.items()}
    return align(vocabs, reference=preset.template_role)


def quantize(source: str | Path, output: str | Path, kind: str, *,
             allow_requantize: bool = False, n_threads: int = 0) -> Path:
    """Write a quantized copy of a GGUF file with llama.cpp's quantizer (``kind``: Q8_0,
    Q5_K_M, Q4_K_M, Q4_0, f16...); the output appears only when complete."""
    return backend.quantize_gguf(source, output, kind, n_threads,
                                 allow_requantize=allow_requantize)


class Session:
    """Models loaded for one preset, a conversation, and the knobs that steer the mix."""

    def __init__(self, preset: Preset, *, params: Mapping[str, float] | None = None,
                 settings: SamplerSettings | None = None, options: LoadOptions | None = None,
                 progress: Progress | None = None,
                 models: Mapping[str, Model] | None = None,
                 report: AlignmentReport | None = None) -> None:
        self.preset = preset
        self.formula = preset.formula
        self.params = dict(preset.params)
        for name, value in (params or {}).items():
            self.set_param(name, value)
        self.settings = settings or SamplerSettings()
        self.options = options or LoadOptions()
        say = progress or (lambda _msg: None)
        if models is None:
            paths = {role: hub.resolve(spec) for role, spec in preset.models.items()}
            report = align({r: backend.read_vocab(p) for r, p in paths.items()},
                           reference=preset.template_role)
            if not report.ok:
                raise EftError(f"preset {preset.name!r}: models do not share a token space: "
                               f"{report.summary()}")
            models = self._load(paths, say)
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
        self.stop: tuple[str, ...] = ()
        """Stop strings used when a call gives none: the text ends before the first one."""
        self.parse_special = False
        """Parse control-token text inside messages (unsafe with untrusted input)."""
        self._specials: re.Pattern[str] | bool | None = None
        self._speculator: speculative.Speculator | None = None
        whole = [r for r, m in self.models.items() if not getattr(m, "partial_rewind", True)]
        self.can_speculate = not whole
        """False when a model cannot roll back part of its cache (recurrent or hybrid):
        every rejected draft would evaluate its whole context again, so decoding is plain."""
        if whole and self.options.speculative:
            say(f"note: {', '.join(whole)} cannot roll back part of its cache (recurrent or "
                "hybrid model): speculative decoding is off")

    # -- loading --------------------------------------------------------------------------
    def _load(self, paths: Mapping[str, Path], say: Progress) -> dict[str, Model]:
        opts = self.options
        gpu = backend.supports_gpu_offload()
        cores = opts.n_threads or max(1, os.cpu_count() or 1)
        share = max(1, cores // len(paths)) if opts.parallel else cores
        loaded: dict[str, Model] = {}
        try:
            for role, path in paths.items():
                spec = self.preset.models[role]
                layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else (
                    opts.n_gpu_layers if opts.n_gpu_layers is not None else (-1 if gpu else 0))
                size = path.stat().st_size / 2**20 if path.is_file() else 0
                say(f"loading {role}: {path.name} ({size:.1f} MiB"
                    f"{', GPU offload' if layers and gpu else ', CPU'})")
                loaded[role] = backend.LlamaModel(
                    path, n_ctx=spec.n_ctx if spec.n_ctx is not None else opts.n_ctx,
                    n_gpu_layers=layers if gpu else 0,
                    n_threads=spec.n_threads or share, n_batch=spec.n_batch or opts.n_batch)
        except BaseException:
            for model in loaded.values():
                model.close()
            raise
        beyond = [f"{role} {m.n_ctx_train}" for role, m in loaded.items()
                  if m.n_ctx > getattr(m, "n_ctx_train", m.n_ctx) > 0]
        if beyond:
            say(f"warning: n_ctx {min(m.n_ctx for m in loaded.values())} is above the training "
                f"context of {', '.join(beyond)} tokens: replies past it may be poor")
        return loaded

    def _set_schedule(self, say: Progress) -> None:
        """The decode schedule: measured (cached per machine and model set) or named."""
        eng = self.engine
        name = self.options.schedule or ("auto" if self.options.parallel else "sequential")
        sizes = {r: float(file_size(m)) for r, m in self.models.items()}
        if name == "auto" and tuning.offloaded(self.models):
            eng.set_schedule(schedules.named("sequential", sizes, eng.n_threads))
            self.schedule_reason = ("every model is offloaded to the GPU: one after another, "
                                    "CPU threads not measured or watched")
            say(f"schedule sequential: {self.schedule_reason}")
        elif name == "auto" and tuning.can_tune(self.models, eng.n_threads):
            self.tuning = tuning.tuned(eng, say=say)
            eng.set_schedule(self.tuning.schedule)
            eng.watch = tuning.watch(eng, self.tuning)
            self.schedule_reason = "measured at load" + (" (cached)" if self.tuning.cached
                                                         else "") + ", watched while decoding"
            say(self.tuning.summary())
        elif name != "auto":
            eng.set_schedule(schedules.named(name, sizes, eng.n_threads))
            self.schedule_reason = f"named ({name})"
        else:
            self.schedule_reason = "nothing to measure (one model, one thread, or fixed threads)"

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

    # -- knobs ----------------------------------------------------------------------------
    def set_param(self, name: str, value: float) -> None:
        """Set a formula parameter (``beta`` or ``lam``/``lambda``)."""
        name = "lam" if name == "lambda" else name
        if name not in PARAMETERS:
            raise EftError(f"unknown parameter {name!r} (known: {', '.join(PARAMETERS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise EftError(f"invalid {name} {value!r}: must be a finite number")
        if abs(value) > limits.PARAM_LIMIT:
            raise EftError(f"invalid {name} {value:g}: the mix overflows float32; use a value "
                           f"in [-{limits.PARAM_LIMIT:g}, {limits.PARAM_LIMIT:g}]")
        params = {**self.params, name: float(value)}
        try:
            self.formula.weights(params)
        except EftError as exc:
            raise EftError(f"invalid {name} {value:g}: {exc}") from None
        self.params = params

    def set_sampling(self, **changes: object) -> None:
        """Change sampler settings (temperature, top_p, top_k, min_p, seed, ...)."""
        try:
            self.settings = replace(self.settings, **changes)  # type: ignore[arg-type]
        except TypeError as exc:
            raise EftError(f"unknown sampler setting: {exc}") from None

    def weights(self) -> np.ndarray:
        """Formula weights for the current parameters, in the engine's role order."""
        w = self.formula.weights(self.params)
        return np.array([w.get(role, 0.0) for role in self.engine.roles], dtype=np.float32)

    def describe(self) -> str:
        """The formula with numbers filled in."""
        return self.formula.describe(self.params)

    # -- roles ----------------------------------------------------------------------------
    def conservative_role(self) -> str:
        """Whose top-p set conservative decoding keeps: the preset's conservative_role, else
        the formula's fine-tuned model under the current knobs."""
        return self.preset.conservative_role or default_conservative_role(self.formula,
                                                                          self.params)

    def draft_role(self) -> str:
        """The model that drafts: the preset's draft_role, else the cheapest model (smallest
        file) with a non-zero weight under the current knobs."""
        return self.preset.draft_role or self.engine.cheapest_role(
            self.weights(), prefer=self.conservative_role())

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

    def roles(self) -> dict[str, str]:
        """What each role does now: template, draft and conservative reference."""
        return {"template": self.preset.template_role, "draft": self.draft_role(),
                "conservative": self.conservative_role()}

    # -- prompts --------------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict[str, str]], *,
                    parse_special: bool | None = None) -> list[int]:
        """Render ``messages`` with the chat template and tokenize them.

        The template's own text is tokenized with special-token parsing; the messages'
        content is not, so a control token's text typed in a message (``<|im_end|>``...)
        stays plain text and cannot fake a turn. ``parse_special`` (default: the session's
        :attr:`parse_special`) parses it too: the raw behaviour, for trusted input only.
        BOS comes first when the model asks for it (``add_bos``) and the template did not
        write it.
        """
        tokens = self._template_tokens(messages, parse_special)
        vocab = self.report.vocabs.get(self.preset.template_role)
        if vocab and vocab.add_bos and vocab.bos >= 0 and tokens[:1] != [vocab.bos]:
            return [vocab.bos, *tokens]
        return tokens

    def _template_tokens(self, messages: list[dict[str, str]], parse_special: bool | None
                         ) -> list[int]:
        ref = self.models[self.preset.template_role]
        vocab = self.report.vocabs.get(self.preset.template_role)

        def text_of(token: int | None) -> str:
            if token is None or token < 0:
                return ""
            return ref.piece(token, special=True).decode("utf-8", "replace")

        tokens = {"bos_token": text_of(vocab and vocab.bos),
                  "eos_token": text_of(vocab and vocab.eos)}
        text = render(self.template, messages, **tokens)
        special = self.parse_special if parse_special is None else parse_special
        pattern = None if special else self._special_pattern()
        contents = [m.get("content") for m in messages]
        if pattern is None or not any(isinstance(c, str) and pattern.search(c)
                                      for c in contents):
            return ref.tokenize(text, add_bos=False, special=True)
        # where each message's content lies in the rendered text: render again with marks
        marked = [{**m, "content": f"\ue000{i}\ue001"} if isinstance(m.get("content"), str)
                  else m for i, m in enumerate(messages)]
        parts = re.split("\ue000(\\d+)\ue001", render(self.template, marked, **tokens))
        spans, pos = [], 0
        for i, part in enumerate(parts):
            piece = contents[int(part)] if i % 2 else part
            if i % 2:
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        if "".join(contents[int(p)] if i % 2 else p for i, p in enumerate(parts)) != text:
            raise EftError("a message holds special-token text and the chat template changes "
                           "messages, so it cannot be kept as plain text; remove it (or parse "
                           "it as control tokens with --parse-special)")
        out: list[int] = []
        start = 0
        for found in pattern.finditer(text):  # plain text where a special overlaps content
            a, b = found.span()
            if any(a < end and b > begin for begin, end in spans):
                if a > start:
                    out += ref.tokenize(text[start:a], add_bos=False, special=True)
                out += ref.tokenize(text[a:b], add_bos=False, special=False)
                start = b
        if start < len(text):
            out += ref.tokenize(text[start:], add_bos=False, special=True)
        return out

    def _special_pattern(self) -> re.Pattern[str] | None:
        """A regex matching the text of every control token of the reference vocabulary."""
        if self._specials is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            mask = ATTR_CONTROL | ATTR_UNKNOWN
            texts = sorted({t.decode("utf-8", "replace") for t, a in
                            zip(vocab.texts, vocab.attrs, strict=False) if a & mask and t}
                           if vocab else (), key=len, reverse=True)
            self._specials = re.compile("|".join(map(re.escape, texts))) if texts else False
        return self._specials or None

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
    def stream(self, tokens: list[int], *, max_tokens: int = 512,
               stop: Sequence[str] | None = None,
               diagnostics: bool = False, top_n: int | None = None) -> Iterator[Chunk]:
        """Generate after ``tokens``; yields text chunks, the last one carries ``finish``.

        ``top_n`` (0 or more) gives each step its log-prob under the mix (temperature 1, no
        filters: as :meth:`score` defines it) and the ``top_n`` most likely tokens there."""
        if max_tokens < 1:
            raise EftError(f"invalid max_tokens {max_tokens}: must be >= 1")
        ref = self.models[self.preset.template_role]
        text = TextStream(self.stop if stop is None else stop)
        finish = "length"
        weights = self.weights()
        self.engine.conservative_role = self.conservative_role()
        drafter = self.draft_role()
        generate = self.engine.generate
        if (self.options.speculative and self.can_speculate
                and speculative.worth_speculating(self.engine, weights, drafter)):
            generate = self.speculator.generate
        steps = generate(tokens, weights, self.settings, max_tokens=max_tokens,
                         diagnostics=diagnostics, top_n=top_n)
        try:
            for step in steps:
                piece = b"" if ref.is_eog(step.token) else ref.piece(step.token)
                yield Chunk(text=text.push(piece), step=step)
                if text.stopped:
                    finish = "stop"
                    break
            else:
                finish = self.engine.finish_reason
        finally:
            steps.close()
        tail = text.flush()  # may apply a stop string that waited for an earlier, longer one
        yield Chunk(text=tail, finish="stop" if text.stopped else finish)

    def prompt_tokens(self, prompt: str, *, raw: bool = True, system: str | None = None
                      ) -> list[int]:
        """Tokens for a one-off prompt: ``raw`` text as is, else one chat turn."""
        if raw:
            return self.raw_tokens(prompt)
        conv = Conversation(system=system, turns=[{"role": "user", "content": prompt}])
        return self.chat_tokens(conv.messages())

    def complete(self, prompt: str, *, raw: bool = True, system: str | None = None,
                 **kwargs: object) -> Iterator[Chunk]:
        """One-off generation: ``raw`` continues the text, else it is a single chat turn."""
        return self.stream(self.prompt_tokens(prompt, raw=raw, system=system),
                           **kwargs)  # type: ignore[arg-type]

    def generate(self, prompt: str, *, raw: bool = True, system: str | None = None,
                 **kwargs: object) -> Result:
        """Like :meth:`complete`, collected into a :class:`Result`."""
        tokens = self.prompt_tokens(prompt, raw=raw, system=system)
        out, steps, finish = [], [], "length"
        for chunk in self.stream(tokens, **kwargs):  # type: ignore[arg-type]
            out.append(chunk.text)
            if chunk.step:
                steps.append(chunk.step)
            if chunk.finish:
                finish = chunk.finish
        return Result(text="".join(out), finish=finish, prompt_tokens=len(tokens), steps=steps)

    def chat(self, message: str, *, max_tokens: int = 512, stop: Sequence[str] | None = None,
             diagnostics: bool = False) -> Iterator[Chunk]:
        """Add a user turn, stream the reply, and keep it in the history.

        When the history no longer fits, the oldest exchanges are dropped (the system prompt
        stays) and a chunk with a ``notice`` says so. An interrupted reply is kept as far as
        it got; a turn that fails leaves the history exactly as it was.
        """
        conv = self.conversation
        before = list(conv.turns)
        conv.add("user", message)
        reserve = min(max_tokens, self.engine.n_ctx // 4)
        try:
            dropped = conv.fit(lambda msgs: len(self.chat_tokens(msgs)),
                               self.engine.n_ctx - reserve)
        except BaseException:
            conv.turns[:] = before
            raise
        reply: list[str] = []
        try:
            if dropped:
                yield Chunk(notice=f"dropped the {dropped} oldest exchange(s) to fit the "
                            f"context of {self.engine.n_ctx} tokens")
            for chunk in self.stream(self.chat_tokens(conv.messages()), max_tokens=max_tokens,
                                     stop=stop, diagnostics=diagnostics):
                reply.append(chunk.text)
                yield chunk
        except Exception:  # a failed turn leaves the history as it was
            conv.turns[:] = before
            raise
        except BaseException:  # Ctrl-C or the caller closing early: keep the partial reply
            conv.add("assistant", "".join(reply))
            raise
        conv.add("assistant", "".join(reply))

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.conversation.turns.clear()

    # -- scoring --------------------------------------------------------------------------
    def score(self, text_or_tokens: str | Sequence[int], *, top_n: int = 0,
              per_model: bool = False) -> Score:
        """Every token's log-prob under the mix (see :mod:`eft_local.scoring`).

        A string is tokenized as raw text (BOS first when the model asks for it); a token
        list is scored as is. The first token has no log-prob (nothing precedes it).
        ``top_n`` adds the most likely tokens at each position, ``per_model`` each model's
        own log-prob of the token. Uses the current knobs and formula; the sampler's
        temperature and filters do not apply (conservative decoding does).
        """
        tokens = (self.raw_tokens(text_or_tokens) if isinstance(text_or_tokens, str)
                  else list(text_or_tokens))
        self.engine.conservative_role = self.conservative_role()
        result = score_tokens(self.engine, tokens, self.weights(), self.settings, top_n=top_n,
                              per_model=per_model)
        return replace(result, formula=self.describe())

    # -- introspection --------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        """A token's text, control tokens shown as themselves."""
        ref = self.models[self.preset.template_role]
        return ref.piece(token, special=True).decode("utf-8", "replace")

    def why(self, k: int = 5) -> dict[str, list[tuple[str, float]]]:
        """Top-k tokens (text, probability) of each model and of the mix at the last step."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EftError(f"invalid k {k!r}: must be an integer >= 1")
        return {name: [(self.token_text(t), p) for t, p in top]
                for name, top in self.engine.why(self.settings, k).items()}

    def stats(self) -> dict[str, object]:
        """Tokens/s, time to first token, time per model and in the sampler."""
        s = self.engine.stats
        return {"generated_tokens": s.generated, "prefill_tokens": s.prefilled,
                "tokens_per_second": s.tokens_per_second(),
                "first_token_seconds": s.first_token_seconds,
                "seconds_per_model": dict(s.eval_seconds),
                "sampler_ms_per_token": 1e3 * s.sampler_seconds / max(1, s.generated),
                "drafted_tokens": s.drafted, "accepted_tokens": s.accepted,
                "acceptance_rate": s.acceptance_rate(), **self.schedule_stats()}

    def schedule_stats(self) -> dict[str, object]:
        """The decode schedule and, when it was measured, its predicted and measured speed
        relative to the largest model alone at its best thread count."""
        out: dict[str, object] = {"schedule": self.engine.schedule.name,
                                  "schedule_stages": self.engine.schedule.describe(),
                                  "schedule_reason": self.schedule_reason,
                                  "threads": self.engine.n_threads}
        w = self.engine.watch
        if w is not None:
            out.update(schedule_probes=w.probes, schedule_switches=w.switches)
        t = self.tuning
        if t is not None:
            predicted, measured = t.ratios()
            out.update(schedule_predicted_ratio=predicted, schedule_measured_ratio=measured,
                       schedule_step_ms=1e3 * t.measured, large_alone_ms=1e3 * t.alone,
                       large_alone_threads=t.alone_threads)
        return out


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
