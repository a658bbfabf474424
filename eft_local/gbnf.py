"""Bounds on a GBNF grammar, checked in Python before llama.cpp sees the text.

llama.cpp's grammar parser recurses once per nested group (and its left-recursion check once
per rule in a chain of leading references), so a small text can end the process with a
stack overflow; its repetition ``{m,n}`` copies the repeated item, and its grammar engine
follows every alternative that may come next, so a small text can also cost gigabytes or
minutes. :func:`check_gbnf` reads the text once (linear time, no recursion) and refuses it
with a one-line :class:`~eft_local.errors.EftError` that names the limit. The numbers were
measured with llama-cpp-python 0.3.36 on x86-64 (2 cores); see the constants.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from eft_local.errors import EftError

MAX_CHARS = 1 << 18
"""Characters of grammar text (256 KiB): this checker reads that much in 0.1-0.3 s here
(the server checks a request's grammar before it queues it); a schema's grammar is far
smaller (an enum of 1,000 short strings: 13 kB)."""
MAX_NESTING = 1024
"""Groups inside groups. llama.cpp's parser uses about 450 bytes of stack per level: it
crashed at 18,600 levels in an 8 MiB main thread, 4,600 in a 2 MiB thread (glibc's default
without a stack limit) and 2,300 in a 1 MiB thread; 1024 levels need about 460 KiB."""
MAX_REPEAT = 2000
"""A count in ``{m,n}``: llama.cpp's own bound (MAX_REPETITION_THRESHOLD), named here."""
MAX_ELEMENTS = 4 << 20
"""Grammar elements after llama.cpp copies what ``{m,n}`` repeats (4 Mi elements, about
100 MB): ``"<10 kB>"{2000}`` made llama.cpp take 480 MB from a 10 kB text."""
MAX_RULES = 20000
"""Rules llama.cpp makes: named rules, groups and the helper rules of repetitions."""
MAX_CHAIN = 1024
"""Rules that can begin one another in a row (``a ::= b "x"``, ``b ::= c "x"``, ...):
llama.cpp's set-up is quadratic in that chain (4,000: 0.4 s, 20,000: 21 s) and its
left-recursion check recurses once per link (about 130 bytes of stack each)."""
MAX_BRANCHES = 2048
"""Places the grammar can be at once before it reads the next character: alternatives and
optional items in a row, each of which llama.cpp follows on its own. A check of every token
of a 128k vocabulary took about 1 ms per branch (1,000 alternatives: 1 s); 200,000 optional
items in a row took llama.cpp 190 s to set up."""
MAX_WORK = 250_000
"""The work of one check of the next token, estimated (see :func:`_reach`): llama.cpp
advances each place it can be at to the places that follow, comparing each new one with
all it made. 100 optional items in a row (work 1,000,000) took 3 s per check of a 128k
vocabulary, 50 (125,000) 0.2 s; an enum of 1,000 values is 1,000. The estimate is a lower
bound where a token's several characters each fan out again (50 optional ``("a" | "b")``
in a row, 333,300, took 50 s): :data:`MAX_STEP_SECONDS` stops those."""
MAX_STEP_SECONDS = 30.0
"""Seconds of grammar work for one token (checking candidates and accepting the one drawn),
checked by :class:`eft_local.backend.Grammar` between llama.cpp calls of at most 4,096
tokens. Within the limits above a check of all 262k tokens of a large vocabulary takes a
few seconds; ``root ::= "a" root "b" | "a" root "c" | "x"`` doubles its work with every
"a" (the 14th took 81 s), which this limit stops after one slow token."""

_TERM = (r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)|\[[^\]\\]*(?:\\.[^\]\\]*)*(?:\]|\Z)'
         r'|!?<(?:\[[0-9]*\]|[^>\n]*)>?|\.')
_TOKENS = re.compile(rf"""
    [ \t]+|\#[^\r\n]*
  | (?P<n>\r\n|\r|\n)
  | (?P<t>(?:(?:{_TERM})[ \t]*)+)
  | (?P<d>[A-Za-z0-9-]+)[ \t]*::=
  | (?P<w>[A-Za-z0-9-]+)[ \t]*
  | (?P<q>\{{[^}}\n]*\}}?|[*+?])
  | (?P<o>.)
""", re.X | re.S)
"""Spaces and comments (no group), a newline, a run of terminals (literals, character
classes, tokens, ``.``), a rule's definition, a reference, a quantifier, anything else."""
_TERMS = re.compile(_TERM, re.S)
_COUNTS = re.compile(r"\{[ \t]*([0-9]+)[ \t]*(?:(,)[ \t]*([0-9]*)[ \t]*)?\}\Z")
_BIG = 1 << 40  # counts are capped here, so no number grows without bound
REF, SIZE, OPTIONAL, COPIES, AGAIN, HOLLOW = range(6)
"""An item of a sequence is a list: the rule it refers to (a group is a rule too; None for
terminals), the grammar elements llama.cpp stores for it, whether a quantifier lets it be
absent, how many copies a quantifier makes, whether another copy may follow one, and
whether what is copied may be empty (a quantifier on an optional item)."""

Item = list
Rule = list[list[Item]]
"""A rule's alternatives, each a sequence of items."""


@dataclass(frozen=True)
class GrammarShape:
    """What :func:`check_gbnf` measured."""

    chars: int
    nesting: int
    rules: int
    elements: int
    chain: int
    branches: int
    work: int


def _too(what: str, value: int, limit: int, unit: str = "") -> EftError:
    return EftError(f"the grammar {what} {value:,}{unit}; the limit is {limit:,}")


def check_gbnf(text: str) -> GrammarShape:
    """Refuse ``text`` when llama.cpp could crash or stall on it (see the limits above);
    its measurements otherwise. Syntax errors are left to llama.cpp."""
    if len(text) > MAX_CHARS:
        raise _too("is", len(text), MAX_CHARS, " characters long")
    rules, nesting, made, elements = _read(text)
    chain, branches, work = _reach(rules)
    if chain > MAX_CHAIN:
        raise _too("has a chain of rules that begin one another", chain, MAX_CHAIN, " long")
    if branches > MAX_BRANCHES:
        raise EftError(f"the grammar can be at {branches:,} places at once (alternatives and "
                       f"optional items in a row); the limit is {MAX_BRANCHES:,}")
    if work > MAX_WORK:
        raise EftError(f"checking the grammar's next token costs about {work:,} steps (the "
                       "places it can be at, each times the square of the places it leads "
                       f"to: optional items in a row); the limit is {MAX_WORK:,}")
    return GrammarShape(chars=len(text), nesting=nesting, rules=made, elements=elements,
                        chain=chain, branches=branches, work=work)


class _Reader:
    """The rules of a grammar text as :func:`_reach` needs them, read token by token."""

    def __init__(self) -> None:
        self.rules: list[Rule] = [[[]]]
        self.names = {"root": 0}
        self.stack = [0]  # the rule being read, then the groups open inside it
        self.seq: list[Item] = self.rules[0][-1]  # the sequence being read
        self.nesting = self.made = self.elements = 0

    def rule(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = len(self.rules)
            self.rules.append([[]])
            self.made += 1
        return self.names[name]

    def define(self, name: str) -> None:
        self.stack = [self.rule(name)]
        self.rules[self.stack[0]][:] = [[]]
        self.seq = self.rules[self.stack[0]][-1]

    def open(self) -> None:
        self.made += 1
        self.rules.append([[]])
        self.seq.append([len(self.rules) - 1, 1, False, 1, False, False])
        self.stack.append(len(self.rules) - 1)
        self.seq = self.rules[-1][-1]
        if len(self.stack) - 1 > self.nesting:
            self.nesting = len(self.stack) - 1
            if self.nesting > MAX_NESTING:
                raise _too("nests groups", self.nesting, MAX_NESTING, " deep")
        self.count()

    def close(self) -> Item | None:
        if len(self.stack) == 1:
            return None  # llama.cpp refuses it
        self.stack.pop()
        self.seq = self.rules[self.stack[-1]][-1]
        return self.seq[-1]

    def alternative(self) -> None:
        self.seq = []
        self.rules[self.stack[-1]].append(self.seq)

    def repeat(self, item: Item, value: str) -> None:
        low, high = _quantifier(value)
        if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
            raise EftError(f"the grammar repeats an item {value[:40]} times; the limit is "
                           f"{MAX_REPEAT:,} ({{m,n}} counts)")
        count = max(low, high or 0, 1)
        self.made += max(1, (high or low + 1) - low)
        item[HOLLOW] = item[HOLLOW] or item[OPTIONAL]
        item[OPTIONAL] = item[OPTIONAL] or low == 0
        item[AGAIN] = item[AGAIN] or high is None or high > 1
        item[COPIES] = min(_BIG, item[COPIES] * count)
        self.elements += item[SIZE] * (count - 1) + 1
        item[SIZE] = min(_BIG, item[SIZE] * count)
        if self.elements > MAX_ELEMENTS:
            raise _too("expands to", self.elements, MAX_ELEMENTS, " elements")
        self.count()

    def count(self) -> None:
        if self.made > MAX_RULES:
            raise _too("makes", self.made, MAX_RULES, " rules")


def _read(text: str) -> tuple[list[Rule], int, int, int]:
    """The rules of ``text``, the deepest nesting of groups, the rules llama.cpp makes
    (named ones, groups and the helpers of repetitions) and its grammar elements; raises
    where a limit is passed on the way (a time linear in the text, no recursion)."""
    read = _Reader()
    names, rule = read.names, read.rule
    seq = read.seq
    last = None  # the item a quantifier applies to
    run = None  # where the run of terminals that is ``last`` lies in the text
    elements = 0
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind not in ("t", "q", None):
            run = None
        if kind == "w":  # the common cases first, inline
            name = match.group(kind)
            last = [names[name] if name in names else rule(name), 1, False, 1, False, False]
            seq.append(last)
            elements += 1
        elif kind == "t":
            run = match.span(kind)
            last = [None, run[1] - run[0], False, 1, False, False]  # one item, unless
            seq.append(last)                                        # quantified
            elements += run[1] - run[0]
        elif kind is None:
            continue
        elif kind == "q":
            if last is None:
                continue  # llama.cpp refuses a quantifier after nothing
            if last[REF] is None and run is not None:  # it applies to the run's last terminal
                terms = _TERMS.findall(text, *run)
                tail = terms[-1] if terms else "."
                size = len(tail) - 2 if tail[0] in "\"[" else 1
                if len(terms) > 1:  # the terminals before it stay one item
                    last[SIZE] = max(1, last[SIZE] - len(tail))
                    last = [None, 1, False, 1, False, False]
                    seq.append(last)
                last[SIZE] = max(size, 1)
                run = None
            read.elements = elements
            read.repeat(last, match.group(kind))
            elements = read.elements
        elif kind == "d":
            read.define(match.group(kind))
            read.count()
            seq, last = read.seq, None
        elif kind == "o":
            char = match.group(kind)
            if char == "(":
                read.seq = seq
                read.open()
                seq, last = read.seq, None
            elif char == ")":
                last = read.close()
                seq = read.seq
            elif char == "|":
                read.alternative()
                seq, last = read.seq, None
                if len(read.rules[read.stack[-1]]) > MAX_BRANCHES:
                    raise EftError(f"a rule of the grammar has more than {MAX_BRANCHES:,} "
                                   f"alternatives; the limit is {MAX_BRANCHES:,}")
            else:
                last = None  # llama.cpp refuses what follows
        elif len(read.stack) == 1:  # a newline ends a rule's sequence
            last = None
    read.elements = elements
    if elements > MAX_ELEMENTS:
        raise _too("expands to", elements, MAX_ELEMENTS, " elements")
    read.count()
    return read.rules, read.nesting, read.made, elements


def _quantifier(value: str) -> tuple[int, int | None]:
    """(least, most) of ``*``, ``+``, ``?`` or ``{m,n}`` (most None: no bound)."""
    if value == "*":
        return 0, None
    if value == "+":
        return 1, None
    if value == "?":
        return 0, 1
    found = _COUNTS.match(value)
    if not found:  # llama.cpp refuses it
        return 1, 1
    low = int(found.group(1)) if len(found.group(1)) < 16 else _BIG
    if not found.group(2):
        return low, low
    high = found.group(3)
    return low, (int(high) if len(high) < 16 else _BIG) if high else None


def _reach(rules: list[Rule]) -> tuple[int, int, int]:
    """The longest chain of rules that can begin one another; the most places the grammar
    can be at once (before the next character: each alternative and each optional item in
    a row that may come next, as llama.cpp's stacks); and the most work of one check of
    the next token, the sum over those places of the square of the places each leads to
    once its character is read (llama.cpp advances every place to those next places,
    comparing each new one with all it made)."""
    nullable = _nullable(rules)

    def empty(item: Item) -> bool:
        return item[OPTIONAL] or (item[REF] is not None and nullable[item[REF]])

    def hollow(item: Item) -> bool:  # each copy a quantifier makes may be empty
        return item[HOLLOW] or (item[REF] is not None and nullable[item[REF]])

    leads: list[list[int]] = []  # the rules each rule may begin with
    for rule in rules:
        leads.append([item[REF] for alt in rule for item in _leading(alt, empty)
                      if item[REF] is not None])
    order, chain = _bottom_up(leads)
    first = [0] * len(rules)  # places a rule's start expands to
    for r in order:
        first[r] = min(_BIG, sum(_places(alt, first, empty, hollow, 0)[0] for alt in rules[r]))
    after = _continuations(rules, first, empty, hollow)
    work = [0] * len(rules)  # the work of a check at a rule's start
    for r in order:
        work[r] = min(_BIG, sum(_work(alt, _places(alt, first, empty, hollow, after[r]), work,
                                      empty, hollow)[0] for alt in rules[r]))
    branches, heaviest = max(first, default=0), max(work, default=0)
    for r, rule in enumerate(rules):
        for alt in rule:
            places = _places(alt, first, empty, hollow, after[r])
            branches = max(branches, *places)
            heaviest = max(heaviest, *_work(alt, places, work, empty, hollow))
    return max(chain, default=0), branches, heaviest


def _leading(alt: list[Item], empty: Callable[[Item], bool]) -> list[Item]:
    """The items ``alt`` may begin with: up to its first one that cannot be empty."""
    out = []
    for item in alt:
        out.append(item)
        if not empty(item):
            break
    return out


def _bottom_up(leads: list[list[int]]) -> tuple[list[int], list[int]]:
    """Rules in an order where each comes after those it may begin with (depth first,
    without recursion; a cycle is left recursion, which llama.cpp refuses), and the length
    of the longest chain from each."""
    order: list[int] = []
    chain = [0] * len(leads)
    state = [0] * len(leads)  # 0 new, 1 in progress, 2 done
    for top in range(len(leads)):
        todo = [top] if not state[top] else []
        while todo:
            r = todo[-1]
            if state[r] == 0:
                state[r] = 1
                todo.extend(x for x in leads[r] if state[x] == 0)
                continue
            todo.pop()
            if state[r] == 2:
                continue
            state[r] = 2
            chain[r] = 1 + max((chain[x] for x in leads[r]), default=0)
            order.append(r)
    return order, chain


def _places(alt: list[Item], first: list[int], empty: Callable[[Item], bool],
            hollow: Callable[[Item], bool], end: int) -> list[int]:
    """For each point of ``alt`` (its start first), the places reachable before the next
    character: each item that may come next, through the ones that may be empty, and
    ``end`` for what follows the rule where it was used."""
    out = [end]
    for item in reversed(alt):
        here = 1 if item[REF] is None else max(1, first[item[REF]])
        if hollow(item):
            here *= item[COPIES]  # each copy may be the one that comes next
        out.append(min(_BIG, here + out[-1] if empty(item) else here))
    out.reverse()
    return out


def _continuations(rules: list[Rule], first: list[int], empty: Callable[[Item], bool],
                   hollow: Callable[[Item], bool]) -> list[int]:
    """For each rule, the most places that can follow its end where it is used (root: 1),
    passed down from the rules that use it until nothing changes (a bounded number of
    rounds: a rule whose continuations grow without end is left to the time limit)."""
    after = [1] * len(rules)
    todo, rounds = list(range(len(rules))), 0
    while todo and rounds < 8 * len(rules) + 64:
        r = todo.pop()
        rounds += 1
        for alt in rules[r]:
            out = _places(alt, first, empty, hollow, after[r])
            for i, item in enumerate(alt):
                if item[REF] is None:
                    continue
                follows = out[i + 1] + (out[i] - out[i + 1] if item[AGAIN] else 0)
                if follows > after[item[REF]]:
                    after[item[REF]] = min(_BIG, follows)
                    todo.append(item[REF])
    return after


def _work(alt: list[Item], places: list[int], work: list[int], empty: Callable[[Item], bool],
          hollow: Callable[[Item], bool]) -> list[int]:
    """For each point of ``alt`` (its start first), the work of checking the next token
    there: for each place that may come next, the square of the places after it
    (``places``: :func:`_places` of ``alt``)."""
    out = [0]
    for i in range(len(alt) - 1, -1, -1):
        item = alt[i]
        if item[REF] is None:
            fan = places[i + 1] + (1 if item[AGAIN] else 0)
            here = min(_BIG, fan * fan)
        else:
            here = max(1, work[item[REF]])
        if hollow(item):
            here *= item[COPIES]
        out.append(min(_BIG, here + out[-1] if empty(item) else here))
    out.reverse()
    return out


def _nullable(rules: list[Rule]) -> list[bool]:
    """Which rules may match the empty text (a worklist: linear in the grammar)."""
    nullable = [False] * len(rules)
    users: list[list[tuple[int, int]]] = [[] for _ in rules]  # alternatives using a rule
    waiting: dict[tuple[int, int], int] = {}  # the rules an alternative still waits on
    todo = []
    for r, rule in enumerate(rules):
        for a, alt in enumerate(rule):
            refs = [item[REF] for item in alt if not item[OPTIONAL]]
            if None in refs:
                continue  # a terminal that must be there
            if not refs:
                if not nullable[r]:
                    nullable[r] = True
                    todo.append(r)
                continue
            waiting[(r, a)] = len(refs)
            for x in refs:
                users[x].append((r, a))
    while todo:
        for key in users[todo.pop()]:
            waiting[key] -= 1
            if waiting[key] == 0 and not nullable[key[0]]:
                nullable[key[0]] = True
                todo.append(key[0])
    return nullable
