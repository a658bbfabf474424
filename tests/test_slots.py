"""Issue 23: several sequences decode together (slots), each as it would alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eft_local.batch import Batch, Plan
from eft_local.engine import Engine, Step
from eft_local.errors import EftError
from eft_local.sampler import SamplerSettings
from eft_local.session import LoadOptions, load_session
from eft_local.speculative import Speculator
from tests.clihelp import run
from tests.fakes import FakeModel, generate
from tests.test_speculative import FORMULA_ROLES, same_steps, weights_for

ROLES = FORMULA_ROLES["up"]


def engine(n_seq: int, *, noise: float = 0.3, n_ctx: int = 256, n_batch: int | None = None,
           parallel: bool = False) -> Engine:
    models = {r: FakeModel(seed=i + 1, noise=noise, n_ctx=n_ctx, n_seq=n_seq,
                           size=100 if r == "large_base" else 10)
              for i, r in enumerate(ROLES)}
    if n_batch is not None:
        for m in models.values():
            m.n_batch = n_batch  # type: ignore[attr-defined]
    return Engine(models, template_role="small_ft", allowed=np.ones(48, dtype=bool),
                  parallel=parallel)


def plan(eng: Engine, prompt: list[int], *, seed: int, beta: float = 1.0,
         temperature: float = 1.0, max_tokens: int = 20, drafter: str | None = None,
         top_k: int = 0) -> Plan:
    w = weights_for(eng, "up", beta)
    return Plan(tuple(prompt), tuple(float(x) for x in w),
                SamplerSettings(temperature=temperature, seed=seed, top_k=top_k), max_tokens,
                "small_ft", drafter=drafter)


PROMPTS = [[5, 9, 14, 3], [7, 7, 2, 30, 11, 4], [12], [40, 41, 42, 43, 44, 45, 46, 47]]
SETTINGS = [dict(seed=1), dict(seed=2, beta=1.5, temperature=0.7),
            dict(seed=3, beta=0.0), dict(seed=4, temperature=0.0, top_k=5)]


def alone(prompt: list[int], *, noise: float = 0.3, **kwargs: object) -> list[Step]:
    eng = engine(1, noise=noise)
    return list(generate(Batch(eng), plan(eng, prompt, **kwargs)))  # type: ignore[arg-type]


def run_together(batch: Batch, plans: list[Plan], joins: dict[int, int] | None = None
                 ) -> tuple[list[list[Step]], list[int]]:
    """Run ``plans`` in one batch; plan i joins at step ``joins[i]`` (default 0). Returns
    each plan's steps and the step count at which each one emitted its first token."""
    joins = joins or {}
    seqs: dict[int, object] = {}
    out: list[list[Step]] = [[] for _ in plans]
    first = [-1] * len(plans)
    step = 0
    while True:
        for i, p in enumerate(plans):
            if i not in seqs and joins.get(i, 0) <= step:
                seqs[i] = batch.add(p)
        if not batch.running and len(seqs) == len(plans):
            break
        owner = {id(s): i for i, s in seqs.items()}
        for seq, st in batch.step():
            i = owner[id(seq)]
            if first[i] < 0:
                first[i] = step
            out[i].append(st)
        step += 1
        assert step < 500
    return out, first


def test_four_sequences_give_each_ones_tokens_alone() -> None:
    eng = engine(4)
    plans = [plan(eng, p, **s) for p, s in zip(PROMPTS, SETTINGS, strict=True)]
    together, _ = run_together(Batch(eng), plans)
    for prompt, settings, steps in zip(PROMPTS, SETTINGS, together, strict=True):
        assert steps == alone(prompt, **settings)
    # one decode per model and step, not one per sequence
    steps_taken = max(len(s) for s in together) + 1
    assert eng.models["large_base"].eval_calls <= steps_taken


def test_a_model_no_running_sequence_weighs_is_not_evaluated() -> None:
    eng = engine(2)
    plans = [plan(eng, PROMPTS[0], seed=1, beta=0.0), plan(eng, PROMPTS[1], seed=2, beta=0.0)]
    run_together(Batch(eng), plans)
    assert eng.models["small_base"].eval_calls == 0
    assert eng.models["small_ft"].eval_calls == 0
    assert eng.models["large_base"].eval_calls > 0


def test_a_joining_prompt_is_read_in_chunks_while_the_others_stream() -> None:
    eng = engine(2, n_batch=8)
    long_prompt = [(3 * i) % 40 + 2 for i in range(40)]
    plans = [plan(eng, PROMPTS[0], seed=1, max_tokens=30), plan(eng, long_prompt, seed=2)]
    together, first = run_together(Batch(eng), plans, joins={1: 3})
    assert together[0] == alone(PROMPTS[0], seed=1, max_tokens=30)
    assert together[1] == alone(long_prompt, seed=2)
    # the running stream got a token at every step while the 40-token prompt was read in
    # chunks of at most 8 - 1 tokens (its own token took one place): it was not held up
    assert first[1] >= 3 + 40 // 8
    assert len(together[0]) >= first[1]


def test_a_cancelled_sequence_frees_its_slot_at_once() -> None:
    eng = engine(2)
    batch = Batch(eng)
    a = batch.add(plan(eng, PROMPTS[0], seed=1, max_tokens=50))
    b = batch.add(plan(eng, PROMPTS[1], seed=2, max_tokens=50))
    assert batch.free_slots() == []
    with pytest.raises(EftError, match="no free slot"):
        batch.add(plan(eng, PROMPTS[2], seed=3))
    batch.step()
    batch.remove(a)
    assert batch.free_slots() == [a.slot]
    steps = [st for seq, st in batch.step() if seq is b]
    assert steps and all(seq is b for seq, _ in batch.step())


def test_a_new_prompt_takes_the_slot_that_holds_its_prefix() -> None:
    eng = engine(3)
    batch = Batch(eng)
    history = [5, 9, 14, 3, 22, 7, 30, 31]
    first = batch.add(plan(eng, history, seed=1, max_tokens=4))
    other = batch.add(plan(eng, [40, 41, 42], seed=2, max_tokens=4))
    while batch.running:
        batch.step()
    # a chat's next turn (its history plus more) returns to the slot that holds the history
    nxt = [*history, *first.tokens[len(history):], 8, 9]
    assert batch.choose_slot(nxt) == first.slot
    # an unrelated request (a client's title request) takes the least recently used slot,
    # never the one holding the conversation
    unused = ({0, 1, 2} - {first.slot, other.slot}).pop()
    assert batch.choose_slot([44, 45, 46, 47]) == unused
    seq = batch.add(plan(eng, nxt, seed=3, max_tokens=2))
    assert seq.slot == first.slot and seq.evaluated == 2 + 1


def test_speculative_alone_then_plain_beside_another_gives_the_same_tokens() -> None:
    eng = engine(2, noise=0.1)
    spec = Speculator(eng, draft_k=3)
    batch = Batch(eng, spec)
    plans = [plan(eng, PROMPTS[0], seed=1, max_tokens=40, drafter="small_ft"),
             plan(eng, PROMPTS[1], seed=2, max_tokens=10)]
    together, _ = run_together(batch, plans, joins={1: 4})
    assert same_steps(together[0], alone(PROMPTS[0], noise=0.1, seed=1, max_tokens=40))
    assert together[1] == alone(PROMPTS[1], noise=0.1, seed=2, max_tokens=10)
    assert eng.stats.drafted > 0  # it drafted while it ran alone
    assert any(st.from_draft for st in together[0])


def test_a_plan_is_checked_when_made() -> None:
    eng = engine(1)
    with pytest.raises(EftError, match="empty prompt"):
        plan(eng, [], seed=1)
    with pytest.raises(EftError, match="max_tokens"):
        plan(eng, [3], seed=1, max_tokens=0)
    with pytest.raises(EftError, match="the context holds 16"):
        Batch(engine(1, n_ctx=16)).add(plan(eng, list(range(2, 20)), seed=1))


# -- the bundled family through the session --------------------------------------------------
QUESTIONS = ["What is the home town of Has Zhithdou?", "In which year was Has Zhithdou born?",
             "Where does Has Zhithdou live?", "What does Has Zhithdou do for a living?"]


def test_four_greedy_chats_at_once_equal_each_one_alone() -> None:
    """The family, four prompts in four slots: the same greedy tokens as one at a time
    (llama.cpp's batched rows differ from one-sequence rows by up to about 0.1 in a logit on
    these models, docs/serving.md: no greedy choice here lands that close to a tie)."""
    opts = dict(n_threads=1, speculative=False)
    with load_session("tiny-up", options=LoadOptions(**opts)) as one:
        want = [one.generate(q, raw=False, temperature=0, max_tokens=24) for q in QUESTIONS]
    with load_session("tiny-up", options=LoadOptions(n_seq=4, **opts)) as many:
        jobs = [(i, (lambda q=q: many.prepare(many.prompt_tokens(q, raw=False),
                                              temperature=0, max_tokens=24)))
                for i, q in enumerate(QUESTIONS)]
        got = dict(many.run_many(jobs))
        assert len(many.batch.slots) == 4
    for i, result in enumerate(want):
        assert [s.token for s in got[i].steps] == [s.token for s in result.steps]
        assert (got[i].text, got[i].finish) == (result.text, result.finish)


@pytest.fixture(scope="module")
def random_trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """Three random-weight models written here."""
    from tests import ggufs

    d = tmp_path_factory.mktemp("trio")
    large = ggufs.write_model(d / "l.gguf", seed=21, n_embd=64, n_layer=2, n_ctx_train=1024)
    return (f"large_base={large}",
            f"small_ft={ggufs.write_model(d / 'f.gguf', seed=22, n_ctx_train=1024)}",
            f"small_base={ggufs.write_model(d / 'b.gguf', seed=23, n_ctx_train=1024)}")


def test_eight_greedy_generations_four_at_a_time_equal_one_at_a_time(
        random_trio: tuple[str, ...]) -> None:
    """Random weights, prompts of 60 to 320 tokens read in chunks beside running streams,
    sequences joining as others finish: the tokens of one at a time in the same session
    (the rows themselves: tests/test_sequences.py)."""
    opts = LoadOptions(n_seq=4, n_threads=1, speculative=False, n_ctx=512)
    with load_session(models=random_trio, options=opts) as s:
        def jobs() -> list[tuple[int, object]]:
            return [(i, (lambda i=i: s.prepare([10 + (37 * i + 11 * k) % 200
                                                for k in range(60 + 37 * i)],
                                               temperature=0, max_tokens=40)))
                    for i in range(8)]
        alone = {i: [st.token for st in r.steps] for i, r in s.run_many(jobs(), parallel=1)}
        together = {i: [st.token for st in r.steps]
                    for i, r in s.run_many(jobs(), parallel=4)}
    assert together == alone


def test_eval_in_parallel_scores_as_one_at_a_time() -> None:
    outs = []
    for np_ in ("1", "3"):
        result = run(["eval", "tiny-up", "--limit", "6", "--json", "-np", np_])
        assert result.exit_code == 0, result.output
        score = json.loads(result.stdout)["scores"][0]
        outs.append({k: score[k] for k in ("n", "correct", "compliant", "declined",
                                           "multi_n", "multi_correct", "multi_compliant",
                                           "tokens")})
    assert outs[0] == outs[1] and outs[0]["n"] == 6


class Failing:
    """A grammar that gives up (its work took too long) at its ``after``-th question."""

    def __init__(self, after: int) -> None:
        self.after = after

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        self.after -= 1
        if self.after < 0:
            raise EftError("the grammar's work for one token took too long")
        return np.ones(len(tokens), dtype=bool)

    def accept(self, token: int) -> None:
        pass

    def clone(self) -> Failing:
        return Failing(self.after)


def test_a_sequence_whose_grammar_fails_ends_alone() -> None:
    """One sequence's own failure (its grammar) ends it; the others in the step go on."""
    from dataclasses import replace

    eng = engine(2)
    batch = Batch(eng)
    bad = batch.add(replace(plan(eng, PROMPTS[0], seed=1), grammar=Failing(3).clone))
    good = batch.add(plan(eng, PROMPTS[1], seed=2))
    got = []
    while batch.running:
        for seq, st in batch.step():
            if seq is good:
                got.append(st)
            elif st is None:
                assert seq is bad
    assert isinstance(bad.error, EftError) and batch.free_slots() == [0, 1]
    assert got == alone(PROMPTS[1], seed=2)
    with pytest.raises(EftError, match="took too long"):
        list(generate(Batch(engine(1)), replace(plan(eng, PROMPTS[0], seed=1),
                                                grammar=Failing(3).clone)))


def test_choices_of_one_prompt_read_it_once() -> None:
    """Several choices of one request (n > 1): the first reads the prompt, the others copy
    its cached prompt (copy_prefix) and evaluate only its last token; each gives the tokens
    of its own seed run alone."""
    eng = engine(3)
    prompt = [(5 * i) % 40 + 2 for i in range(30)]
    fed = {role: 0 for role in ROLES}
    for role, model in eng.models.items():
        decode_ = model.decode

        def counted(parts, out=None, role=role, decode_=decode_):  # noqa: ANN001, ANN202
            fed[role] += sum(len(p.tokens) for p in parts)
            return decode_(parts, out)

        model.decode = counted  # type: ignore[method-assign]
    batch = Batch(eng)
    first = batch.add(plan(eng, prompt, seed=1, max_tokens=8))
    others = [batch.add(plan(eng, prompt, seed=s, max_tokens=8), share=first)
              for s in (2, 3)]
    got: dict[int, list[Step]] = {0: [], 1: [], 2: []}
    seqs = [first, *others]
    while batch.running:
        for seq, st in batch.step():
            got[seqs.index(seq)].append(st)
    for i, seed in enumerate((1, 2, 3)):
        assert got[i] == alone(prompt, seed=seed, max_tokens=8)
    # the prompt was read once (30 tokens), each copy evaluated its last token only
    assert fed["large_base"] == 30 + 2 * 1 + sum(len(g) - 1 for g in got.values())
    assert [s.evaluated for s in seqs] == [30, 1, 1]
