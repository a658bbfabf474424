"""Hypothesis fuzzing of JSON schemas and GBNF grammars, run as a child process by
test_fuzz_grammar.py: a crash kills this process with a signal, which the parent reports
(the case being run is written to ``current-case`` first).

Each schema goes through :func:`eft_local.schema.schema_grammar` (the one way every entry
point converts one), each GBNF text through :func:`eft_local.backend.check_grammar`; what
they accept becomes llama.cpp's grammar sampler over a tiny model's vocabulary, is asked
about every token and accepts a few. All of it runs in a thread with a 1 MiB stack (half of
glibc's smallest default), as the server's worker runs it in a thread. A refusal must be a
one-line :class:`~eft_local.errors.EftError`; no call may take longer than
:data:`STALL_SECONDS` (llama.cpp's set-up of a grammar cannot be interrupted).

Usage: python -m tests.fuzz_grammar_driver WORKDIR [EXAMPLES]   (FUZZ_RANDOM=1: fresh cases;
FUZZ_SHRINK=1: shrink a failing case)
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from eft_local import backend
from eft_local.backend import tools
from eft_local.errors import EftError
from eft_local.schema import schema_grammar
from eft_local.session import LoadOptions, load_session
from tests.ggufs import write_model

WORK = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
EXAMPLES = int(sys.argv[2]) if len(sys.argv) > 2 else 50
STALL_SECONDS = 20.0
"""Longest one call may take (every bound here keeps them under a second)."""
tools.MAX_STEP_SECONDS = 5.0  # a grammar whose work multiplies fails fast here,
tools.CHUNK = 32  # checked every 32 tokens of the tiny vocabulary
SEEN: dict[str, int] = {}
"""How many cases ended how (printed at the end)."""

SESSION = load_session(models=[f"small_ft={write_model(WORK / 'tiny.gguf', seed=2)}"],
                       options=LoadOptions(n_threads=1))
IDS = np.arange(SESSION.vocab_size)


# -- a thread with a small stack runs every case --------------------------------------------------
_todo: queue.Queue = queue.Queue()


def _serve() -> None:
    while True:
        work, box = _todo.get()
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc
        box["done"].set()


threading.stack_size(1 << 20)
threading.Thread(target=_serve, daemon=True, name="small stack").start()
threading.stack_size(0)


def in_small_stack(work: Callable[[], Any]) -> Any:
    box: dict[str, Any] = {"done": threading.Event()}
    _todo.put((work, box))
    if not box["done"].wait(600):
        raise AssertionError("a case never ended")
    if "error" in box:
        raise box["error"]
    return box["value"]


def timed(what: str, work: Callable[[], Any]) -> Any:
    began = time.perf_counter()
    try:
        return work()
    finally:
        spent = time.perf_counter() - began
        assert spent < STALL_SECONDS, f"{what} took {spent:.1f} s"


def exercise(text: str) -> str:
    """llama.cpp's sampler for ``text`` over the vocabulary: ask about every token, accept
    a few (the first allowed each time). How it ended."""
    grammar = timed("the grammar's set-up", lambda: SESSION.grammar(text))
    for _ in range(6):
        ok = timed("a check of every token", lambda: grammar.allowed(IDS))
        if not ok.any():
            return "dead end"
        token = int(np.flatnonzero(ok)[0])
        if SESSION.models["small_ft"].is_eog(token):
            return "complete"
        timed("an accept", lambda: grammar.accept(token))  # noqa: B023
    return "stepped"


def run_case(kind: str, value: Any, convert: Callable[[Any], str]) -> None:
    try:
        case = json.dumps({"kind": kind, "value": value}, ensure_ascii=True, default=repr)
    except RecursionError:
        case = json.dumps({"kind": kind, "value": "(nested too deep to print)"})
    (WORK / "current-case").write_text(case[:100_000])

    def work() -> str:
        try:
            text = timed("the conversion and check", lambda: convert(value))
        except EftError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"not one line: {message!r}"
            return "refused"
        try:
            return exercise(text)
        except EftError as exc:
            assert "\n" not in str(exc), f"not one line: {exc!s}"
            return "stopped"

    outcome = in_small_stack(work)
    SEEN[f"{kind} {outcome}"] = SEEN.get(f"{kind} {outcome}", 0) + 1


PHASES = [Phase.explicit, Phase.generate, *([Phase.shrink] if "FUZZ_SHRINK" in os.environ else [])]
"""No shrinking unless FUZZ_SHRINK is set: the failing case is written out as it is."""
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, phases=PHASES,
                derandomize="FUZZ_RANDOM" not in os.environ,
                suppress_health_check=list(HealthCheck))


# -- JSON schemas ---------------------------------------------------------------------------------
COUNTS = st.sampled_from([0, 1, 3, 999, 1000, 1001, 50_000, 40_000_000, -1, 2**63, 1.5, "7",
                          True, None])
REFS = st.sampled_from(["#", "#/", "#/$defs/a", "#/$defs/nope", "#/properties", "#/items/0",
                        "https://127.0.0.1:9/s.json", "http://127.0.0.1:9/", "file:///etc/passwd",
                        "s.json#/a", "", "//x/y", 5, None, ["#"]])
PATTERNS = st.sampled_from(["^a{0,5000}$", "^a{1000}$", "^(a|b)*$", "^[a-z]{2,3}$", "^(((a)))$",
                            "^" + "(" * 300 + "a" + ")" * 300 + "$", "a{", "^\\d+(\\.\\d+)?$",
                            "^(a?){0,999}$", "^[^\"]{0,1000}b{0,1000}$", "(", "^$", "x" * 3000])
TEXT = st.text(max_size=8)
SCALAR = TEXT | st.integers(-3, 3) | st.none() | st.booleans()
LEAVES = (
    st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null",
                                           "object", "array", "nonsense")])
    | st.builds(lambda k, v: {"type": "string", k: v},
                st.sampled_from(["maxLength", "minLength"]), COUNTS)
    | st.builds(lambda n, long: {"enum": [("x" * long) + str(i) for i in range(n)]},
                st.sampled_from([0, 1, 3, 1000, 1001, 5000]), st.sampled_from([0, 40]))
    | st.builds(lambda v: {"const": v}, SCALAR | st.just({"$ref": "https://127.0.0.1:9/"}))
    | st.builds(lambda r: {"$ref": r}, REFS)
    | st.builds(lambda p: {"type": "string", "pattern": p}, PATTERNS)
    | st.builds(lambda f: {"type": "string", "format": f},
                st.sampled_from(["date", "uuid", "email", "date-time"]))
)


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    names = st.text(alphabet="abc-_ \"\\", min_size=1, max_size=4)
    return (
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": [k for k in props if req]},
                  st.dictionaries(names, children, max_size=4), st.booleans())
        | st.builds(lambda item, lo, hi: {"type": "array", "items": item, "minItems": lo,
                                          "maxItems": hi}, children, COUNTS, COUNTS)
        | st.builds(lambda xs: {"anyOf": xs}, st.lists(children, max_size=4))
        | st.builds(lambda xs: {"allOf": xs}, st.lists(children, max_size=3))
        | st.builds(lambda xs: {"type": "array", "prefixItems": xs}, st.lists(children,
                                                                              max_size=3))
        | st.builds(lambda a, ref: {"$defs": {"a": a}, "$ref": ref}, children, REFS)
        | st.builds(lambda a, n: {"$defs": {"a": a}, "allOf": [{"$ref": "#/$defs/a"}] * n},
                    children, st.sampled_from([1, 2, 50, 500]))
    )


def _deep(depth: int, kind: str) -> dict:
    node: dict = {"type": "integer"}
    for _ in range(depth):
        node = ({"type": "array", "items": node} if kind == "array" else
                {"type": "object", "properties": {"a": node}, "required": ["a"]})
    return node


SCHEMAS = (st.recursive(LEAVES, _extend, max_leaves=12)
           | st.builds(_deep, st.sampled_from([10, 31, 32, 33, 200, 2000]),
                       st.sampled_from(["array", "object"])))


@FUZZ
@given(schema=SCHEMAS)
@example(schema={"type": "string", "maxLength": 50_000})
@example(schema={"type": "array", "minItems": 40_000_000})
@example(schema={"enum": [f"value {i}" for i in range(100_000)]})
@example(schema={"$ref": "https://127.0.0.1:9/s.json"})
@example(schema={"type": "object", "properties": {f"p{i}": {} for i in range(1000)}})
def fuzz_schemas(schema: Any) -> None:
    run_case("schema", schema, schema_grammar)


# -- GBNF texts -----------------------------------------------------------------------------------
PIECES = st.sampled_from(['root', '::=', '"a"', '"ab"', '""', "[a-z]", "[^x]", "(", ")", "|",
                          "*", "+", "?", "{0,5}", "{2000}", "{0,2001}", "{99999999999999999999}",
                          "{3,}", "x", "x ::=", "\n", ".", "<[5]>", "!<[5]>", "#c\n", '"', "[",
                          "]", "{", "}", "\\", "root ::=", "\x00", "é"])
RANDOM_GBNF = st.lists(PIECES, max_size=40).map(" ".join)


def _chain(n: int, tail: str) -> str:
    return "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1}{tail}\n' for i in range(n)) + \
        f'r{n} ::= "y"\n'


HOSTILE_GBNF = st.one_of(
    st.builds(lambda n: "root ::= " + "(" * n + '"a"' + ")" * n,
              st.sampled_from([100, 1024, 1025, 5000, 30_000])),
    st.builds(lambda n, item: "root ::= " + f"{item} " * n + '\nx ::= "a" | ',
              st.sampled_from([100, 2047, 2049, 8000]), st.sampled_from(['"a"?', "x", "x?"])),
    st.builds(_chain, st.sampled_from([100, 1023, 1025, 3000]), st.sampled_from([' "x"', ""])),
    st.builds(lambda n: "root ::= " + " | ".join(f'"{i}"' for i in range(n)),
              st.sampled_from([10, 2048, 2049, 10_000])),
    st.builds(lambda size, n: f'root ::= "{"a" * size}"{{{n}}}', st.sampled_from([1, 100, 5000]),
              st.sampled_from([2, 2000, 2001])),
    st.sampled_from(['root ::= ("a"{0,2000}){0,2000}', 'root ::= (("a"?){0,2000})',
                     'root ::= ("a"?)*', 'root ::= root "a" | "b"', 'root ::= x\nx ::= root',
                     'root ::= "a" root "b" | "a" root "c" | "x"',
                     'root ::= "a" root "b" | "a" root "c"', 'root ::= [a-z]{1,2000}',
                     'root ::= ' + '("a" | "b")? ' * 1500]),
)


@st.composite
def mutated_gbnf(draw: st.DrawFn) -> str:
    """A converter grammar with a few characters changed."""
    text = schema_grammar(draw(st.sampled_from([
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 20}}},
        {"enum": ["x", "y", "zz"]}, {"type": "array", "items": {"type": "number"}}])))
    chars = list(text)
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(chars)))
        chars.insert(at, draw(st.sampled_from(list('()|*+?{}"[]\n') + ["{2000}", "(" * 50])))
    return "".join(chars)


@FUZZ
@given(text=RANDOM_GBNF | HOSTILE_GBNF | mutated_gbnf())
@example(text="root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000)
@example(text='root ::= "' + "a" * 10_000 + '"{2000}')
@example(text="root ::= " + '"a"? ' * 200_000)
def fuzz_gbnf(text: str) -> None:
    run_case("gbnf", text, backend.check_grammar)


def main_() -> None:
    for fuzz in (fuzz_schemas, fuzz_gbnf):
        print(f"{fuzz.__name__}: {EXAMPLES} examples", file=sys.stderr, flush=True)
        fuzz()
    print("cases (kind outcome: count): " + ", ".join(
        f"{k}: {n}" for k, n in sorted(SEEN.items())), file=sys.stderr)
    print("fuzz: all passed", file=sys.stderr)


if __name__ == "__main__":
    main_()
