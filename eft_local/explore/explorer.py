"""``eft-local explore``: which file for which role? Quality, speed and memory of each
combination of candidate GGUF files.

Each combination is mixed by one formula and compared, position by position over a text,
with a reference combination (default: the largest candidate file of each role): KL
divergence, top-1 agreement and perplexity (:mod:`eft_local.explore.metrics`). The reference's
distributions are computed once and cached on disk, compressed to the top-k log-probs and
the remaining mass, under a key made of its files' hashes, the formula, the knobs, the text
and the window. Costs: decode tokens/s (plain and speculative), time to first token, model
bytes, KV cache and measured RSS.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from eft_local import sampler, speculative
from eft_local.errors import EftError
from eft_local.explore.candidates import Combination, preset_for
from eft_local.explore.metrics import Quality, TopK, kl_topk, pareto, summarise, top_k
from eft_local.explore.refcache import Reference, ReferenceCache, token_chunks
from eft_local.files import read_user_text
from eft_local.presets import FAMILY_DIR, PACKAGE_DIR, Preset, preset_from_paths
from eft_local.sampler import SamplerSettings
from eft_local.scoring import logit_rows
from eft_local.session import LoadOptions, Session, check_models
from eft_local.vocab import AlignmentReport, align

FAMILY_TEXT = FAMILY_DIR / "heldout.txt"
"""Fresh documents of the bundled family's world (``python -m training.heldout_text``)."""
ENGLISH_TEXT = PACKAGE_DIR / "texts" / "english.txt"
"""A short English sample, for real models."""
DEFAULT_TOP_K = 128
DEFAULT_WINDOW = 512

Say = Callable[[str], None]


# -- text and its windows ----------------------------------------------------------------------
def default_text(vocab_texts: Sequence[bytes]) -> Path:
    """The family's held-out sample for the family's vocabulary, else the English one."""
    family = check_models(preset_from_paths([f"small_ft={FAMILY_DIR / 'small_ft.gguf'}"]))
    same = tuple(family.vocabs["small_ft"].texts) == tuple(vocab_texts)
    return FAMILY_TEXT if same else ENGLISH_TEXT


def read_text(path: Path) -> str:
    """A UTF-8 text file; one-line errors."""
    text = read_user_text(path, what="text file")
    if not text.strip():
        raise EftError(f"{path}: the text is empty")
    return text


def read_ids(path: Path) -> tuple[int, ...]:
    """A JSON list of token ids; one-line errors."""
    text = read_user_text(path, what="token id file")
    try:
        ids = json.loads(text)
    except (RecursionError, ValueError) as exc:
        raise EftError(f"{path}: cannot read as a JSON list of token ids ({exc})") from None
    if not isinstance(ids, list) or len(ids) < 2 or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise EftError(f"{path}: must be a JSON list of at least 2 token ids (integers >= 0)")
    return tuple(ids)


def text_logprobs(session: Session, chunks: Sequence[list[int]], *, piece: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The session's mixed log-probs over ``chunks`` (each evaluated from an empty cache):
    yields (rows, next-token ids), each row predicting its next token.

    Batched evaluations of every position (:func:`eft_local.scoring.logit_rows`, as scoring
    uses); :meth:`Session.score` gives log-probs of the text's own tokens only, and KL needs
    the whole distribution. ``piece`` (default: what keeps a batch's rows near 64 MiB)
    bounds the positions per batch.
    """
    engine = session.engine
    weights, allowed = session.weights(), session.report.allowed
    piece = piece or int(np.clip(2**24 // (allowed.size * len(engine.roles)), 1, 512))
    for chunk in chunks:
        ids = np.asarray(chunk, dtype=np.int64)
        for rows, predicted in logit_rows(engine, chunk, piece=piece, through_last=False):
            yield sampler.mix_logits(rows, weights, allowed), ids[predicted.start:predicted.stop]


# -- one row per combination -------------------------------------------------------------------
@dataclass
class Row:
    """What one combination scored and cost."""

    label: str
    files: dict[str, str]
    quality: Quality
    tokens_per_second: float
    speculative_tokens_per_second: float | None
    first_token_seconds: float
    model_bytes: int
    kv_bytes: int
    rss_bytes: int
    accuracy: float | None = None
    format_rate: float | None = None
    is_reference: bool = False
    pareto: bool = False

    @property
    def memory_bytes(self) -> int:
        """Model files plus KV caches."""
        return self.model_bytes + self.kv_bytes

    @property
    def speed(self) -> float:
        """Decode tokens/s, the better of plain and speculative decoding."""
        return max(self.tokens_per_second, self.speculative_tokens_per_second or 0.0)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"label": self.label, "files": self.files, **self.quality.to_dict(),
                "tokens_per_second": self.tokens_per_second,
                "speculative_tokens_per_second": self.speculative_tokens_per_second,
                "first_token_seconds": self.first_token_seconds,
                "model_bytes": self.model_bytes, "kv_bytes": self.kv_bytes,
                "memory_bytes": self.memory_bytes, "rss_bytes": self.rss_bytes,
                "accuracy": self.accuracy, "format_rate": self.format_rate,
                "is_reference": self.is_reference, "pareto": self.pareto}


@dataclass(frozen=True)
class Skipped:
    """A combination that could not be evaluated, and why."""

    label: str
    files: dict[str, str]
    reason: str


def mark_pareto(rows: Sequence[Row]) -> list[Row]:
    """Sort by quality (mean KL, then top-1 agreement) and mark the Pareto-optimal rows."""
    rows = sorted(rows, key=lambda r: (r.quality.kl_mean, -r.quality.top1_agreement))
    flags = pareto([(r.quality.kl_mean, r.speed, r.memory_bytes) for r in rows])
    for row, flag in zip(rows, flags, strict=True):
        row.pareto = flag
    return rows


def current_rss() -> int:
    """Resident set size of this process now, in bytes (peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


@dataclass(frozen=True)
class Settings:
    """How to explore: text, compression, decode measurement, optional questions."""

    text: str | None = None  # None: the default sample for the reference's vocabulary
    text_name: str = "the given text"  # where ``text`` came from, for messages
    top_k: int = DEFAULT_TOP_K
    window: int = DEFAULT_WINDOW
    decode_tokens: int = 64
    prompts: int = 6
    prompt_tokens: int = 64
    questions: Sequence[object] = ()
    decline_text: str | None = None
    token_ids: tuple[int, ...] | None = None  # compare on these instead of a text


class Explorer:
    """Evaluates combinations against one cached reference."""

    def __init__(self, template: Preset, reference: Combination, settings: Settings, *,
                 params: Mapping[str, float] | None = None,
                 options: LoadOptions | None = None, cache_dir: Path | None = None,
                 say: Say | None = None) -> None:
        self.template = template
        self.params = {**template.params, **(params or {})}
        self.reference = reference
        self.settings = settings
        self.options = options or LoadOptions()
        self.cache = ReferenceCache(cache_dir)
        self.say = say or (lambda _m: None)
        self.ref: Reference | None = None
        self.ref_source = ""
        self.ref_report = check_models(preset_for(template, reference))
        self._ref_pieces: AlignmentReport | None = None
        if not self.ref_report.ok:
            raise EftError(f"the reference combination is incompatible: "
                           f"{self.ref_report.summary()}")
        if settings.token_ids is not None:
            self.settings = replace(settings, text="token ids: " + json.dumps(
                list(settings.token_ids)))
            self.text_source = settings.text_name
        elif settings.text is None:
            path = default_text(self.ref_report.vocabs[template.template_role].texts)
            self.settings = replace(settings, text=read_text(path))
            self.text_source = str(path)
        else:
            self.text_source = settings.text_name
        self.key = self.cache.key(
            reference.files, self.text, formula=template.formula.text,
            template_role=template.template_role,
            params={k: float(v) for k, v in self.params.items()},
            top_k=settings.top_k, window=settings.window,
            n_ctx=[self.options.n_ctx, {r: m.n_ctx for r, m in template.models.items()}])

    @property
    def text(self) -> str:
        """The evaluation text."""
        assert self.settings.text is not None
        return self.settings.text

    # -- the reference ------------------------------------------------------------------
    def prepare(self, will_run: Sequence[Combination]) -> None:
        """Load the cached reference, or compute it now unless a combination to run is the
        reference itself (then it is computed while that combination runs)."""
        self.ref = self.cache.load(self.key)
        if self.ref is not None:
            self.ref_source = "cache"
            self.say(f"reference: from the cache ({self.cache.path(self.key)})")
        elif all(c.key() != self.reference.key() for c in will_run):
            with self._open(self.reference) as session:
                self._compute_reference(session)

    def _compute_reference(self, session: Session) -> Reference:
        s = self.settings
        ref_model = session.models[session.preset.template_role]
        vocab = session.report.vocabs[session.preset.template_role]
        tokens = (list(s.token_ids) if s.token_ids is not None
                  else ref_model.tokenize(self.text, add_bos=False, special=True))
        bos = vocab.bos if vocab.add_bos and vocab.bos >= 0 else -1
        window = min(s.window, session.engine.n_ctx)
        chunks = token_chunks(tokens, window, None if bos < 0 else bos)
        parts, nlls = [], []
        for lp, targets in text_logprobs(session, chunks):
            parts.append(top_k(lp, s.top_k))
            nlls.append(-lp[np.arange(len(targets)), targets])
        if not parts:
            raise EftError(f"{self.text_source}: the text is {len(tokens)} token(s); "
                           "comparing needs at least 2")
        self.ref = Reference(tokens=np.asarray(tokens, dtype=np.int32), window=window, bos=bos,
                             dist=TopK.concat(parts), nll=np.concatenate(nlls),
                             meta={"files": {r: str(p) for r, p in
                                             self.reference.files.items()},
                                   "formula": self.template.formula.text,
                                   "params": self.params})
        path = self.cache.save(self.key, self.ref)
        self.ref_source = "computed"
        self.say(f"reference: computed over {len(self.ref.nll)} positions, cached in {path}")
        return self.ref

    # -- one combination ----------------------------------------------------------------
    def _open(self, combo: Combination) -> Session:
        preset = preset_for(self.template, combo)
        return Session(preset, params=self.params, options=self.options,
                       sampling=SamplerSettings(temperature=0.0))

    def check(self, combo: Combination) -> str | None:
        """Why ``combo`` cannot be compared with the reference, or None."""
        try:
            report = check_models(preset_for(self.template, combo))
        except EftError as exc:
            return str(exc)
        if not report.ok:
            return report.summary()
        ref = self.ref_report.vocabs[self.template.template_role]
        if ref.text_kind != "piece" and any(v.text_kind == "piece"
                                            for v in report.vocabs.values()):
            if self._ref_pieces is None:  # an engine that shows only pieces: compare those
                self._ref_pieces = check_models(preset_for(self.template, self.reference),
                                                pieces=True)
            ref = self._ref_pieces.vocabs[self.template.template_role]
        both = align({**report.vocabs, "(reference)": ref},
                     reference=self.template.template_role)
        if not both.ok:
            return f"cannot be compared with the reference: {both.summary()}"
        return None

    def run(self, combo: Combination) -> Row | Skipped:
        """Evaluate one combination; a Skipped record when it is incompatible or fails."""
        files = {r: str(p) for r, p in combo.files.items()}
        why = self.check(combo)
        if why is not None:
            return Skipped(combo.label, files, why)
        before = current_rss()
        try:
            with self._open(combo) as session:
                row = self._measure(session, combo)
        except EftError as exc:
            if self.ref is None:  # the reference itself failed: nothing can be compared
                raise EftError(f"the reference combination failed: {exc}") from None
            return Skipped(combo.label, files, str(exc))
        row.rss_bytes = max(0, row.rss_bytes - before)
        return row

    def _measure(self, session: Session, combo: Combination) -> Row:
        rss = current_rss()
        is_ref = combo.key() == self.reference.key()
        if self.ref is None:
            if not is_ref:
                raise EftError("the reference is not ready (call prepare first)")
            self._compute_reference(session)
        ref = self.ref
        assert ref is not None
        if session.engine.n_ctx < ref.window:
            raise EftError(f"its context ({session.engine.n_ctx} tokens) is shorter than the "
                           f"reference's window ({ref.window})")
        kls, agree, nll, at = [], [], [], 0
        for lp, targets in text_logprobs(session, ref.chunks()):
            n = len(targets)
            part = TopK(ref.dist.ids[at:at + n], ref.dist.logprobs[at:at + n],
                        ref.dist.rest[at:at + n])
            kls.append(kl_topk(part, lp))
            agree.append(np.argmax(lp, axis=1) == part.top1)
            nll.append(-lp[np.arange(n), targets])
            at += n
        rss = max(rss, current_rss())
        quality = summarise(np.concatenate(kls), np.concatenate(agree), np.concatenate(nll))
        plain, ttft = self._decode(session, ref, speculative=False)
        spec = None
        if self.options.speculative and speculative.worth_speculating(
                session.engine, session.weights(), session.draft_role()):
            spec, _ = self._decode(session, ref, speculative=True)
        rss = max(rss, current_rss())
        accuracy = format_rate = None
        if self.settings.questions:
            from eft_local.evaluate import Target, run_target

            score = run_target(session, Target(combo.label, session.preset, self.params),
                               self.settings.questions,  # type: ignore[arg-type]
                               max_tokens=24, decline_text=self.settings.decline_text,
                               multi_turn=False)
            accuracy, format_rate = score.accuracy, score.format_rate
        models = session.models.values()
        return Row(label=combo.label, files={r: str(p) for r, p in combo.files.items()},
                   quality=quality, tokens_per_second=plain, speculative_tokens_per_second=spec,
                   first_token_seconds=ttft,
                   model_bytes=sum(Path(m.path).stat().st_size for m in models
                                   if not getattr(m, "remote", False)),
                   kv_bytes=sum(getattr(m, "kv_cache_bytes", lambda _n: 0)(m.n_ctx)
                                for m in models),
                   rss_bytes=max(rss, current_rss()), accuracy=accuracy,
                   format_rate=format_rate, is_reference=is_ref)

    def _decode(self, session: Session, ref: Reference, *, speculative: bool
                ) -> tuple[float, float]:
        """Greedy decode from a few prompts cut from the text, each prefilled from an empty
        cache: the median over prompts of tokens/s after the first token, and of the time to
        the first token (medians: one stall on a busy machine does not decide a row)."""
        s = self.settings
        tokens = ref.tokens.tolist()
        length = max(1, min(s.prompt_tokens, session.engine.n_ctx - s.decode_tokens - 1,
                            len(tokens)))
        span = max(1, len(tokens) - length)
        starts = sorted({int(i * span / s.prompts) for i in range(s.prompts)})
        rates, firsts = [], []
        session.options = replace(session.options, speculative=speculative)
        for i, start in enumerate([starts[0], *starts]):  # the first run warms up, untimed
            prompt = tokens[start:start + length]
            for model in session.models.values():
                model.rewind(0)
            session.engine.stats.reset()
            t0 = time.perf_counter()
            for _chunk in session.stream(prompt, max_tokens=s.decode_tokens):
                pass
            total = time.perf_counter() - t0
            stats = session.stats()
            first = float(stats["first_token_seconds"] or 0.0)  # type: ignore[arg-type]
            after = int(stats["generated_tokens"]) - 1  # type: ignore[call-overload]
            if i == 0:
                continue
            firsts.append(first)
            if after > 0 and total > first:
                rates.append(after / (total - first))
        session.options = replace(session.options, speculative=self.options.speculative)
        return (statistics.median(rates) if rates else 0.0), statistics.median(firsts)
