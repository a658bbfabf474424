"""The work of each endpoint, run by the worker thread on the loaded session.

Each ``*_work`` function validates what it can before queueing and returns the job's work:
a function of the session and the job that emits events (:class:`~eft_local.server.worker.
Job`). Every call is made with the job's own settings (``job.settings``).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from eft_local.chat import fit_messages
from eft_local.errors import ContextFull
from eft_local.records import finite, step_record
from eft_local.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    model_name,
    parse_chat,
)
from eft_local.server.replies import chat_reply
from eft_local.server.shapes import chat_logprob, finish_reason
from eft_local.server.worker import Job, Task
from eft_local.session import Chunk, Request, SamplerSettings, Session, Settings, Step


def describe(session: Session, settings: Settings) -> dict[str, Any]:
    """The ``eft`` object of a response: what the request was served with."""
    knobs = settings.knobs()
    return {"preset": session.preset.name, "formula": settings.describe(), "params": knobs,
            "model": model_name(session.preset.name, knobs),
            "base_role": settings.formula.base_role(),
            "conservative_role": session.conservative_role(settings)}


def token_record(session: Session, step: Step, *, content: str, base: str | None,
                 alternatives: int = 0) -> dict[str, Any]:
    """One entry of ``eft.tokens``: :func:`~eft_local.records.step_record` plus the reply
    text the token released (``content``), its log-prob under the mix (temperature 1, no
    filters) and under each model, ``shift`` = log p_mix - log p_base (``base``: the
    formula's base term) and, with ``alternatives``, the best tokens of each model and of
    the mix."""
    record = step_record(session, step)
    record["content"] = content
    if step.ref_token is not None:
        record["ref_text"] = session.token_text(step.ref_token)
    models = {r: finite(v) for r, v in (step.logprob_models or {}).items()}
    mix = None if step.logprob is None else finite(step.logprob)
    record["logprob_mix"] = mix
    record["logprob_models"] = models
    record["shift"] = mix - models[base] if mix is not None and base in models else None
    if alternatives and step.top_models is not None:
        def listed(top: Sequence[tuple[int, float]]) -> list[dict[str, Any]]:
            return [{"token": t, "text": session.token_text(t), "logprob": finite(lp)}
                    for t, lp in top[:alternatives]]

        record["alternatives"] = {**{r: listed(top) for r, top in step.top_models.items()},
                                  "mix": listed(step.top or ())}
    return record


def _settings(job: Job) -> Settings:
    assert job.settings is not None, "the worker sets a job's settings before its work"
    return job.settings


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def too_long(session: Session, count: int, param: str) -> ApiError:
    """The 400 of a prompt of ``count`` tokens that does not fit the context."""
    return ApiError(400, f"this model's context holds {session.n_ctx} tokens; the prompt is "
                    f"{count} tokens", param=param, code="context_length_exceeded")


def check_text(session: Session, text: str, param: str, *, parse_special: bool,
               context: bool = True) -> None:
    """400 before any tokenizing when ``text`` cannot fit the context (with ``context``):
    more characters than the context's tokens can hold, or more control-token texts than
    it holds tokens (special-token parsing costs their number times the text's length)."""
    n_ctx, longest = session.n_ctx, session.longest_token
    if context and len(text) > n_ctx * longest:
        raise ApiError(400, f"this model's context holds {n_ctx} tokens, at most "
                       f"{n_ctx * longest} characters (no token is longer than {longest}); "
                       f"the prompt is {len(text)} characters", param=param,
                       code="context_length_exceeded")
    if parse_special:
        specials = session.special_count(text)
        if specials >= n_ctx:
            raise ApiError(400, f"the prompt holds {specials} control-token texts, each a "
                           f"token; this model's context holds {n_ctx} tokens", param=param,
                           code="context_length_exceeded")


def fit_characters(session: Session, messages: list[dict[str, str]], settings: Settings
                   ) -> tuple[list[dict[str, str]], int]:
    """Before any tokenizing, what the characters alone decide (a message of N characters is
    at least N / :attr:`Session.longest_token` tokens): under the ``truncate`` policy the
    oldest turns that cannot fit are dropped here (returned: the messages left and how many
    were dropped); under ``error``, or when the newest message and the system messages alone
    are too long, a 400."""
    budget = session.n_ctx * session.longest_token

    def chars(msgs: list[dict[str, str]]) -> int:
        return sum(len(m["content"]) for m in msgs)

    def refuse(count: int) -> ApiError:
        return ApiError(400, f"this model's context holds {session.n_ctx} tokens, at most "
                        f"{budget} characters (no token is longer than "
                        f"{session.longest_token}); the messages are {count} characters",
                        param="messages", code="context_length_exceeded")

    if settings.context_overflow == "error":
        if chars(messages) > budget:
            raise refuse(chars(messages))
        return messages, 0
    try:
        return fit_messages(messages, chars, budget)
    except ContextFull:
        raise refuse(chars(messages)) from None


def check_tokens(session: Session, tokens: Sequence[int], param: str) -> None:
    """400 unless every id is in the vocabulary."""
    n = session.vocab_size
    bad = next((t for t in tokens if not 0 <= t < n), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{n - 1})",
                       param=param)


class Streamer:
    """One generation's chunks as ``chunk`` events (text, log-probs, diagnostics); then a
    ``done`` event with usage and llama-server style ``timings`` (prompt tokens evaluated
    and re-used from the slot's cache). ``convert`` may rewrite each chunk, its ``finish``
    too; ``label`` names tokens in log-prob entries (default: their text)."""

    def __init__(self, session: Session, job: Job, request: Request, *, top_n: int | None,
                 index: int = 0, convert: Callable[[dict[str, Any]], dict[str, Any]] | None
                 = None, label: Callable[[int], str] | None = None,
                 emit: Callable[[str, Any], None] | None = None) -> None:
        self.session, self.job, self.request = session, job, request
        self.emit = emit or job.emit
        self.logprob = 0.0
        """The sum of its tokens' log-probs under the mix (with ``top_n``)."""
        self.top_n, self.index, self.convert = top_n, index, convert
        self.label = label or session.token_text
        diagnostics = job.knobs.diagnostics
        self.alternatives = job.knobs.alternatives if diagnostics else 0
        self.base = request.settings.formula.base_role()
        self.pending: list[dict[str, Any]] = []
        self.eft_pending: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.told: str | None = None
        self.count = 0
        self.first: float | None = None
        self.evaluated = len(request.tokens)
        self.task = Task(request, self.feed, self.done)

    def feed(self, chunk: Chunk) -> None:
        """One chunk of the generation."""
        session, job, top_n = self.session, self.job, self.top_n
        if chunk.step is not None:
            step = chunk.step
            if self.first is None:
                self.first = time.perf_counter()
            self.count += 1
            job.generated += 1
            self.logprob += step.logprob if step.logprob is not None else 0.0
            if top_n is not None:  # every token, end of turn too: usage counts it
                self.pending.append(chat_logprob(  # log-probs pass records.finite there
                    self.label(step.token), session.token_bytes(step.token),
                    step.logprob if step.logprob is not None else float("nan"),
                    [(self.label(t), session.token_bytes(t), lp)
                     for t, lp in (step.top or ())[:top_n]]))
            if job.knobs.diagnostics:
                self.eft_pending.append(token_record(session, step, content=chunk.text,
                                                     base=self.base,
                                                     alternatives=self.alternatives))
        elif chunk.text and self.eft_pending:  # text held back to the end: the last token's
            self.eft_pending[-1]["content"] += chunk.text
        if chunk.finish:
            self.finish = chunk.finish
        if chunk.evaluated is not None:
            self.evaluated = chunk.evaluated
        if chunk.text or chunk.finish:
            data = {"index": self.index, "text": chunk.text, "logprobs": self.pending,
                    "eft": self.eft_pending,
                    "finish": finish_reason(chunk.finish) if chunk.finish else None}
            data = self.convert(data) if self.convert else data
            self.told = data["finish"] or self.told
            self.emit("chunk", data)
            self.pending, self.eft_pending = [], []

    def done(self) -> None:
        """The generation ended: usage and timings."""
        job, n_prompt, count = self.job, len(self.request.tokens), self.count
        started = self.task.started
        ended = time.perf_counter()
        first = self.first or ended
        evaluated = self.evaluated
        job.info.update(prompt_tokens=n_prompt, completion_tokens=count,
                        cancelled=job.cancelled.is_set())
        timings = {"cache_n": n_prompt - evaluated, "prompt_n": evaluated,
                   "prompt_ms": 1e3 * (first - started),
                   "prompt_per_second": evaluated / max(first - started, 1e-9),
                   "predicted_n": count, "predicted_ms": 1e3 * (ended - first),
                   "predicted_per_second": (count - 1) / (ended - first) if count > 1 and
                   ended > first else 0.0}
        job.check()  # stopped by a shutdown: the client gets 503, not a cut answer
        self.emit("done", {"index": self.index, "prompt_tokens": n_prompt,
                          "cached_tokens": n_prompt - evaluated, "completion_tokens": count,
                          "finish": self.told or (finish_reason(self.finish) if self.finish
                                                  else "length"),
                          "timings": timings})


def prepared(session: Session, job: Job, tokens: Sequence[int], *, max_tokens: int,
             stop: Sequence[str], top_n: int | None, grammar: str | None,
             prompt_param: str) -> Request:
    """The request of one completion's generation after ``tokens``."""
    if len(tokens) >= session.n_ctx:
        raise too_long(session, len(tokens), prompt_param)
    alternatives = job.knobs.alternatives if job.knobs.diagnostics else 0
    settings = _settings(job).replace(stop=tuple(stop), grammar=grammar or "")
    return session.prepare(tokens, settings=settings,
                           max_tokens=max(1, min(max_tokens, session.n_ctx - len(tokens))),
                           diagnostics=job.knobs.diagnostics,
                           top_n=None if top_n is None and not alternatives
                           else max(top_n or 0, alternatives))


def chat_work(req: ChatRequest, *, default_max: int, system: str | None,
              default_stop: Sequence[str], reasoning_format: str = "deepseek"
              ) -> Callable[[Session, Job], list[Task] | None]:
    """The job of one chat completion: prepared in one pass (fitted to the context,
    rendered, tokenized, its grammar made in the shape of the chat template's replies),
    then one generation (read back by :class:`~eft_local.server.replies.ChatReply`)."""

    def work(session: Session, job: Job) -> list[Task] | None:
        messages = req.messages
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        max_tokens = req.common.max_tokens or default_max
        plan = req.tools
        messages, early = fit_characters(session, messages, _settings(job))
        if job.cancelled.is_set():  # the client left: no tokenizing for nobody
            return None
        grammar, convert = chat_reply(session, job, req, reasoning_format)
        stop = default_stop if req.common.stop is None else req.common.stop
        top_n = req.top_logprobs if req.logprobs else None
        alternatives = job.knobs.alternatives if job.knobs.diagnostics else 0
        try:
            request = session.prepare_chat(
                messages, settings=_settings(job).replace(stop=tuple(stop),
                                                          grammar=grammar or ""),
                max_tokens=max_tokens, tools=plan and [t.card() for t in plan.tools],
                diagnostics=job.knobs.diagnostics,
                top_n=None if top_n is None and not alternatives
                else max(top_n or 0, alternatives))
        except ContextFull as exc:  # before the first byte: a stream gets the 400 too
            raise ApiError(400, str(exc), param="messages",
                           code="context_length_exceeded") from None
        dropped = request.dropped + early
        eft = describe(session, _settings(job))
        if dropped:  # said once: in the response's eft object and the log line
            eft["dropped_messages"] = job.info["dropped_messages"] = dropped
        job.emit("start", {"eft": eft, "prompt_tokens": len(request.tokens)})
        tasks = [Streamer(session, job, choice, top_n=top_n, index=i,  # a reader each
                          convert=convert if i == 0 else chat_reply(
                              session, job, req, reasoning_format)[1]).task
                 for i, choice in enumerate(choices(request, req.common.n))]
        for task in tasks[1:]:
            task.share = tasks[0]
        return tasks

    return work


def _offsets(pieces: Sequence[bytes], skip_first: bool, start: int = 0) -> list[int]:
    """Character offset of each token in the text its pieces decode to."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out, pos = [], start
    for i, piece in enumerate(pieces):
        out.append(pos)
        if not (skip_first and i == 0):
            pos += len(decoder.decode(piece))
    return out


def completion_work(req: CompletionRequest, *, default_max: int,
                    default_stop: Sequence[str]) -> Callable[[Session, Job], list[Task] | None]:
    """The job of one (legacy) completion request: one choice per prompt, each prompt's
    echo scored first, their generations side by side in free slots."""

    max_tokens = default_max if req.common.max_tokens is None else req.common.max_tokens
    evaluated = max_tokens > 0 or req.logprobs is not None  # the prompt must fit the context

    def work(session: Session, job: Job) -> list[Task] | None:
        vocab = session.report.vocabs.get(session.preset.template_role)
        bos = vocab.bos if vocab is not None and vocab.add_bos and vocab.bos >= 0 else None
        prompts = []
        for i, prompt in enumerate(req.prompts):
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            if job.cancelled.is_set():  # the client left: no tokenizing for nobody
                return None
            if isinstance(prompt, str):
                if not prompt:
                    raise ApiError(400, "the prompt is empty", param=param)
                check_text(session, prompt, param, parse_special=True, context=evaluated)
                tokens = session.tokenize(prompt, add_bos=False, parse_special=True)
                added_bos = bos is not None  # as llama.cpp adds it: in front, once
                tokens = [bos, *tokens] if bos is not None else tokens
                text = prompt
            else:
                check_tokens(session, prompt, param)
                tokens, added_bos, text = list(prompt), False, session.detokenize(prompt)
            if evaluated and len(tokens) >= session.n_ctx:
                raise too_long(session, len(tokens), param)
            prompts.append((tokens, added_bos, text, param))
        best = req.best_of > req.common.n  # the candidates' mean log-prob ranks them
        requests = [None if max_tokens == 0 else prepared(
            session, job, tokens, max_tokens=max_tokens,
            stop=default_stop if req.common.stop is None else req.common.stop,
            top_n=0 if best and req.logprobs is None else req.logprobs,
            grammar=req.common.grammar, prompt_param=param)
            for tokens, _bos, _text, param in prompts]
        job.emit("start", {"eft": describe(session, _settings(job)),
                           "prompt_tokens": sum(len(p[0]) for p in prompts)})
        tasks: list[Task] = []
        n = req.common.n
        for p, ((tokens, added_bos, text, param), request) in enumerate(
                zip(prompts, requests, strict=True)):
            if job.cancelled.is_set():
                return None
            echoed = _echo(session, job, req, tokens, added_bos, text, param) if (
                req.echo) else None
            for index in range(p * n, (p + 1) * n):  # choice p * n + i (OpenAI's order)
                if echoed is not None:
                    job.emit("chunk", {**echoed, "index": index})
                if request is None:
                    job.info = {"prompt_tokens": len(tokens), "completion_tokens": 0,
                                "cancelled": False}
                    job.emit("done", {"index": index, "prompt_tokens": len(tokens),
                                      "cached_tokens": 0, "completion_tokens": 0,
                                      "finish": "length", "timings": {}})
            if request is None:
                continue
            label = token_id_label if req.token_ids else session.token_text
            ranked = BestOf(job, n, p * n) if best else None
            first = len(tasks)
            for i, choice in enumerate(choices(request, req.best_of)):
                streamer = Streamer(session, job, choice, top_n=req.logprobs,
                                    index=p * n + i, convert=_legacy(len(text), req.logprobs),
                                    label=label)
                if ranked is not None:
                    streamer.emit = ranked.emitter(i, streamer)
                tasks.append(streamer.task)
                if i:
                    streamer.task.share = tasks[first]
        return tasks

    return work


def choices(request: Request, n: int) -> list[Request]:
    """``n`` choices of one prepared request: the same prompt and settings, each with its own
    seed (the request's, then +1, +2...)."""
    sampling = request.plan.sampling
    return [replace(request, plan=replace(request.plan, sampling=replace(
        sampling, seed=(sampling.seed + i) % 2**63))) for i in range(n)]


class BestOf:
    """``best_of`` candidates of one prompt: their events are held back, and once every one
    is done the ``n`` with the highest mean log-prob per token (under the mix) are sent as
    the choices ``base .. base + n - 1``, best first."""

    def __init__(self, job: Job, n: int, base: int) -> None:
        self.job, self.n, self.base = job, n, base
        self.held: dict[int, list[tuple[str, Any]]] = {}
        self.scores: dict[int, float] = {}
        self.streamers: dict[int, Streamer] = {}

    def emitter(self, i: int, streamer: Streamer) -> Callable[[str, Any], None]:
        """Where candidate ``i``'s events go."""
        self.streamers[i] = streamer

        def emit(kind: str, data: Any) -> None:
            self.held.setdefault(i, []).append((kind, data))
            if kind == "done":
                self.scores[i] = streamer.logprob / max(1, streamer.count)
                if len(self.scores) == len(self.streamers):
                    self._send()

        return emit

    def _send(self) -> None:
        ranked = sorted(self.scores, key=lambda i: (-self.scores[i], i))[: self.n]
        for rank, i in enumerate(ranked):
            for kind, data in self.held[i]:
                self.job.emit(kind, {**data, "index": self.base + rank})


def _echo(session: Session, job: Job, req: CompletionRequest, tokens: list[int],
          added_bos: bool, text: str, param: str) -> dict[str, Any]:
    """The chunk that starts a prompt's choices with its text, and its tokens' log-probs
    under the mix when ``logprobs`` asks (scored once, in a free slot)."""
    top_n = req.logprobs
    label = token_id_label if req.token_ids else session.token_text
    record: dict[str, Any] = {"text": text, "echo": True}
    if top_n is not None:
        if len(tokens) >= session.n_ctx:
            raise too_long(session, len(tokens), param)
        scored = session.score(tokens, settings=_settings(job), top_n=top_n)
        pieces = [session.token_bytes(t) for t in tokens]
        record["legacy_logprobs"] = {  # a masked token's -inf leaves as records.finite's floor
            "tokens": ([label(t) for t in tokens] if req.token_ids
                       else [_text(p) for p in pieces]),
            "token_logprobs": [None if t.logprob is None else finite(t.logprob)
                               for t in scored.tokens],
            "top_logprobs": [None if t.logprob is None else
                             {label(i): finite(lp) for i, lp in t.top}
                             for t in scored.tokens],
            "text_offset": _offsets(pieces, added_bos)}
    return record


def token_id_label(token: int) -> str:
    """A token named by id, as vLLM's ``return_tokens_as_token_ids`` names it."""
    return f"token_id:{token}"


def _legacy(offset: int, top_n: int | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Turn the chat-style logprob entries of one generation's chunks into completions'
    ``logprobs`` object, with text offsets continuing from ``offset``."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pos = offset

    def convert(data: dict[str, Any]) -> dict[str, Any]:
        nonlocal pos
        entries = data.pop("logprobs")
        if top_n is None:
            return data
        offsets = []
        for entry in entries:
            offsets.append(pos)
            pos += len(decoder.decode(bytes(entry["bytes"])))
        data["legacy_logprobs"] = {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}
        return data

    return convert


def tokenize_work(body: Mapping[str, Any]) -> Callable[[Session, Job], None]:
    """``/tokenize``: ``{"prompt" (or "content"), "add_special_tokens"}`` or
    ``{"messages"}`` (rendered with the chat template) -> ``{"tokens", "count",
    "max_model_len"}``."""
    messages = body.get("messages")
    prompt = body.get("prompt", body.get("content"))
    add_special = body.get("add_special_tokens", body.get("add_special", True))
    if not isinstance(add_special, bool):
        raise ApiError(400, "'add_special_tokens' must be true or false",
                       param="add_special_tokens")
    parse_special = body.get("parse_special", True)
    if not isinstance(parse_special, bool):
        raise ApiError(400, "'parse_special' must be true or false", param="parse_special")
    if messages is None and not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or give 'messages')", param="prompt")

    def work(session: Session, job: Job) -> None:
        if messages is not None:
            chat = parse_chat({"messages": messages}, SamplerSettings(), 0)
            tokens = session.chat_tokens(chat.messages)
        else:
            check_text(session, prompt, "prompt", parse_special=parse_special, context=False)
            tokens = session.tokenize(prompt, add_bos=add_special,
                                      parse_special=parse_special)
        job.emit("result", {"tokens": tokens, "count": len(tokens),
                            "max_model_len": session.n_ctx})

    return work


def detokenize_work(body: Mapping[str, Any]) -> Callable[[Session, Job], None]:
    """``/detokenize``: ``{"tokens"}`` -> ``{"prompt"}``."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")

    def work(session: Session, job: Job) -> None:
        check_tokens(session, tokens, "tokens")
        job.emit("result", {"prompt": session.detokenize(tokens)})

    return work


def tokenizer_info_work(session: Session, job: Job) -> None:
    """``/tokenizer_info``: the template model's special tokens and chat template."""
    vocab = session.report.vocabs.get(session.preset.template_role)

    def text(token: int | None) -> str | None:
        return session.token_text(token) if token is not None and token >= 0 else None

    job.emit("result", {
        "model": session.preset.name, "tokenizer_class": "llama.cpp",
        "vocab_type": vocab.vocab_type if vocab else None,
        "vocab_size": session.vocab_size,
        "bos_token": text(vocab.bos if vocab else None),
        "eos_token": text(vocab.eos if vocab else None),
        "eot_token": text(vocab.eot if vocab else None), "pad_token": None,
        "bos_token_id": vocab.bos if vocab else None,
        "eos_token_id": vocab.eos if vocab else None,
        "add_bos_token": bool(vocab and vocab.add_bos),
        "add_eos_token": bool(vocab and vocab.add_eos),
        "model_max_length": session.n_ctx,
        "chat_template": session.template})
