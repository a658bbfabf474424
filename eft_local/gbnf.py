"""Bounds on a GBNF grammar, checked in Python before llama.cpp sees the text.

llama.cpp's grammar parser recurses once per nested group (and its left-recursion check once
per rule in a chain of leading references), so a small text can end the process with a
stack overflow; its repetition ``{m,n}`` copies the repeated item, and its grammar engine
follows every alternative that may come next, so a small text can also cost gigabytes or
minutes. :func:`check_gbnf` reads the text once (linear time, no recursion) and refuses it
with a one-line :class:`~eft_local.errors.EftError` that names the limit. The numbers were
measured with llama.cpp 0.3.36 (llama-cpp-python) on x86-64; see the constants.
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
REF, SIZE, OPTIONAL, COPIES = range(4)
"""An item of a sequence is a list: the rule it refers to (a group is a rule too; None for
terminals), the grammar elements llama.cpp stores for it, whether a quantifier lets it be
absent, and how many times a quantifier may repeat it."""

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


def _too(what: str, value: int, limit: int, unit: str = "") -> EftError:
    return EftError(f"the grammar {what} {value:,}{unit}; the limit is {limit:,}")


def check_gbnf(text: str) -> GrammarShape:
    """Refuse ``text`` when llama.cpp could crash or stall on it (see the limits above);
    its measurements otherwise. Syntax errors are left to llama.cpp."""
    if len(text) > MAX_CHARS:
        raise _too("is", len(text), MAX_CHARS, " characters long")
    rules, nesting, made, elements = _read(text)
    chain, branches = _reach(rules)
    if chain > MAX_CHAIN:
        raise _too("has a chain of rules that begin one another", chain, MAX_CHAIN, " long")
    if branches > MAX_BRANCHES:
        raise EftError(f"the grammar can be at {branches:,} places at once (alternatives and "
                       f"optional items in a row); the limit is {MAX_BRANCHES:,}")
    return GrammarShape(chars=len(text), nesting=nesting, rules=made, elements=elements,
                        chain=chain, branches=branches)


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
        self.seq.append([len(self.rules) - 1, 1, False, 1])
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
        item[OPTIONAL] = item[OPTIONAL] or low == 0
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
    elements = 0
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "w":  # the common cases first, inline
            name = match.group(kind)
            last = [names[name] if name in names else rule(name), 1, False, 1]
            seq.append(last)
            elements += 1
        elif kind == "t":
            run = match.group(kind).rstrip(" \t")
            last = [None, len(run), False, 1]  # the run is one item, unless quantified
            seq.append(last)
            elements += len(run)
        elif kind is None:
            continue
        elif kind == "q":
            if last is None:
                continue  # llama.cpp refuses a quantifier after nothing
            if last[REF] is None and last[SIZE] > 1:  # it applies to the run's last terminal
                tail = _TERMS.findall(text, match.start() - last[SIZE], match.start())[-1]
                size = len(tail) - 2 if tail[0] in "\"[" else 1
                if len(tail) < last[SIZE]:  # the terminals before it stay one item
                    last[SIZE] -= len(tail)
                    last = [None, 1, False, 1]
                    seq.append(last)
                last[SIZE] = max(size, 1)
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


def _reach(rules: list[Rule]) -> tuple[int, int]:
    """The longest chain of rules that can begin one another, and the most places the
    grammar can be at once (from any point of any rule: what may come next, counting each
    alternative and each optional item in a row, as llama.cpp's stacks do)."""
    nullable = _nullable(rules)

    def empty(item: Item) -> bool:
        return item[OPTIONAL] or (item[REF] is not None and nullable[item[REF]])

    leads: list[list[int]] = []  # the rules each rule may begin with
    for rule in rules:
        lead = []
        for alt in rule:
            for item in alt:
                if item[REF] is not None:
                    lead.append(item[REF])
                if not empty(item):
                    break
        leads.append(lead)
    first = [0] * len(rules)  # places a rule's start expands to
    chain = [0] * len(rules)
    state = [0] * len(rules)  # 0 new, 1 in progress, 2 done
    for top in range(len(rules)):
        todo = [top] if not state[top] else []
        while todo:  # depth first without recursion
            r = todo[-1]
            if state[r] == 0:
                state[r] = 1
                todo.extend(x for x in leads[r] if state[x] == 0)
                continue
            todo.pop()
            if state[r] == 2:
                continue
            state[r] = 2  # a lead still in progress is left recursion: llama.cpp refuses it
            chain[r] = 1 + max((chain[x] for x in leads[r]), default=0)
            first[r] = min(_BIG, sum(_suffix(alt, first, empty, 0)[0] for alt in rules[r]))
    branches = max(first, default=0)  # a rule's start: root's, or where one is used
    for rule in rules:
        for alt in rule:
            branches = max(branches, *_suffix(alt, first, empty, 1))
    return max(chain, default=0), branches


def _suffix(alt: list[Item], first: list[int], empty: Callable[[Item], bool], end: int
            ) -> list[int]:
    """For each point of ``alt`` (its start first), the places reachable before the next
    character: each item that may come next, through the ones that may be empty, and
    ``end`` for what follows the rule (where it was used: counted there)."""
    out = [end]
    for item in reversed(alt):
        here = 1 if item[REF] is None else max(1, first[item[REF]])
        if empty(item):
            here = min(_BIG, here * item[COPIES] + out[-1])  # each copy may come next
        out.append(here)
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
