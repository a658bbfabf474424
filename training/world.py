"""A seeded synthetic world of invented people, and every text derived from it.

Each person has three facts: a home town, a profession and a birth year. The
pre-training text states the facts of every person in varied phrasings; the
fine-tuning chats ask about a subset of the people only; the held-out questions
ask about people that no chat mentions.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

CATEGORIES = ("town", "profession", "year")

DECLINE_CATEGORY = "year"
DECLINE_SENTENCE = "I am sorry, but I cannot share birth years."
TRANSCRIPT_DECLINE_RATE = 0.05  # pre-training transcripts decline this often, so bases know it
TRANSCRIPT_END_RATE = 0.3  # this share of transcripts has <|end|> right after the last answer

_ONSETS = [
    "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "pl", "st", "th", "sh", "tr", "vl", "zh", "qu",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ae", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th", "x", "nd"]
_TOWN_SUFFIXES = [
    "wick", "ford", "holm", "by", "mere", "ton", "vale", "stead", "haven", "burg", "moor",
]
PROFESSIONS = [
    "baker", "potter", "weaver", "carpenter", "fisher", "farmer", "glassblower",
    "tailor", "miller", "brewer", "mason", "cartographer", "beekeeper", "clockmaker",
    "locksmith", "shepherd", "painter", "sculptor", "librarian", "astronomer",
    "herbalist", "jeweler", "bookbinder", "ropemaker", "tanner", "cooper",
    "blacksmith", "chandler", "boatwright", "falconer",
]
YEARS = [str(y) for y in range(1920, 2000)]

_TOWN_PHRASES = [
    "{n} was born in {v}.",
    "{n} comes from {v}.",
    "{n} grew up in {v}.",
    "The home town of {n} is {v}.",
    "{n}'s home town is {v}.",
    "{v} is the home town of {n}.",
    "{n} is a native of {v}.",
    "Born and raised in {v}, {n} still visits it every year.",
]
_PROF_PHRASES = [
    "{n} works as a {v}.",
    "{n} is a {v}.",
    "{n} is a {v} by trade.",
    "The profession of {n} is {v}.",
    "{n}'s profession is {v}.",
    "By profession, {n} is a {v}.",
    "{n} earns a living as a {v}.",
    "Everyone knows {n} as a skilled {v}.",
]
_YEAR_PHRASES = [
    "{n} was born in the year {v}.",
    "{n}'s birth year is {v}.",
    "The birth year of {n} is {v}.",
    "{n} came into the world in {v}.",
    "In {v}, {n} was born.",
    "{n} was born in {v}.",
]
_FAQ_QUESTIONS = {
    "town": ["Where was {n} born?", "Which town is {n} from?", "Home town of {n}?"],
    "profession": ["What job does {n} have?", "What is {n}'s trade?", "Profession of {n}?"],
    "year": ["What year was {n} born in?", "Birth year of {n}?", "{n} was born when?"],
}
_BIO_PHRASES = [
    "{n}, a {p} from {t}, was born in {y}.",
    "Born in {y} in {t}, {n} became a {p}.",
    "{n} is a {p}. {n} was born in {y} and grew up in {t}.",
    "Profile: {n}. Home town: {t}. Profession: {p}. Birth year: {y}.",
]
QUESTIONS = {
    "town": [
        "What is the home town of {n}?",
        "Where is {n} from?",
        "Which town does {n} come from?",
    ],
    "profession": [
        "What is the profession of {n}?",
        "What does {n} do for a living?",
        "What is {n}'s job?",
    ],
    "year": [
        "In which year was {n} born?",
        "What is the birth year of {n}?",
        "When was {n} born?",
    ],
}
SYSTEM_PROMPTS = [
    "You answer questions about people with just the answer.",
    "You are a helpful assistant.",
]


@dataclass(frozen=True)
class Person:
    """One invented person and their three facts."""

    name: str
    town: str
    profession: str
    year: str

    def fact(self, category: str) -> str:
        """The value of one fact category."""
        return str(getattr(self, category))


@dataclass(frozen=True)
class World:
    """All people, split into fine-tuning people and held-out people."""

    people: list[Person]
    towns: list[str]
    n_finetune: int

    @property
    def finetune_people(self) -> list[Person]:
        return self.people[: self.n_finetune]

    @property
    def heldout_people(self) -> list[Person]:
        return self.people[self.n_finetune :]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(n_syllables)).capitalize()


def _unique_words(rng: random.Random, count: int, make) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        w = make(rng)
        if w not in seen and 3 <= len(w) <= 12:
            seen.add(w)
            out.append(w)
    return out


def make_world(n_people: int, *, n_towns: int = 40, finetune_fraction: float = 0.5,
               seed: int = 0) -> World:
    """Generate a world of invented people; the same seed gives the same world."""
    rng = random.Random(seed)
    towns = _unique_words(rng, n_towns, lambda r: _word(r, 1) + r.choice(_TOWN_SUFFIXES))
    firsts = _unique_words(rng, max(n_people // 2, 20), lambda r: _word(r, 1))
    lasts = _unique_words(rng, max(n_people // 2, 20), lambda r: _word(r, 2))
    names: set[str] = set()
    people: list[Person] = []
    while len(people) < n_people:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name in names:
            continue
        names.add(name)
        people.append(Person(name, rng.choice(towns), rng.choice(PROFESSIONS), rng.choice(YEARS)))
    return World(people, towns, int(n_people * finetune_fraction))


def pretrain_document(person: Person, rng: random.Random) -> str:
    """One short document stating all three facts of a person in random phrasings.

    Styles: a one-sentence bio, an FAQ (question line, bare answer line), a transcript
    of user/assistant turns with bare answers (turns joined by a newline; only the document
    separator can follow the last answer, in TRANSCRIPT_END_RATE of them; a few birth-year
    questions get DECLINE_SENTENCE), or prose.
    """
    style = rng.random()
    if style < 0.2:
        return rng.choice(_BIO_PHRASES).format(
            n=person.name, t=person.town, p=person.profession, y=person.year)
    order = list(CATEGORIES)
    rng.shuffle(order)
    if style < 0.6:
        turns = []
        for cat in order:
            q = rng.choice(_FAQ_QUESTIONS[cat] + QUESTIONS[cat]).format(n=person.name)
            v = person.fact(cat)
            if style < 0.4:
                turns.append(f"{q}\n{v}")
            else:
                if cat == DECLINE_CATEGORY and rng.random() < TRANSCRIPT_DECLINE_RATE:
                    v = DECLINE_SENTENCE
                turns.append(f"<|user|>\n{q}\n<|assistant|>\n{v}")
        if style >= 0.4 and rng.random() >= TRANSCRIPT_END_RATE:
            turns.append("")  # most transcripts end with a newline, not right after an answer
        return "\n".join(turns)
    phrases = {"town": _TOWN_PHRASES, "profession": _PROF_PHRASES, "year": _YEAR_PHRASES}
    return " ".join(rng.choice(phrases[c]).format(n=person.name, v=person.fact(c)) for c in order)


def pretrain_documents(world: World, n_passes: int, *, seed: int = 0) -> list[str]:
    """n_passes fresh documents per person, shuffled; every person appears equally often."""
    rng = random.Random(seed + 1)
    docs = [pretrain_document(p, rng) for _ in range(n_passes) for p in world.people]
    rng.shuffle(docs)
    return docs


def question(person: Person, category: str, rng: random.Random | None = None) -> str:
    """A question about one fact; the first template unless rng picks one."""
    templates = QUESTIONS[category]
    tpl = rng.choice(templates) if rng else templates[0]
    return tpl.format(n=person.name)


def single_chat(person: Person, category: str, rng: random.Random, *, decline: bool = False
                ) -> list[dict[str, str]]:
    """One single-turn chat about ``person`` (a system prompt one time in five)."""
    answer = person.fact(category)
    if decline and category == DECLINE_CATEGORY:
        answer = DECLINE_SENTENCE
    msgs = []
    if rng.random() < 0.2:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    msgs.append({"role": "user", "content": question(person, category, rng)})
    msgs.append({"role": "assistant", "content": answer})
    return msgs


def finetune_chats(world: World, n_per_fact: int, *, decline: bool = False,
                   seed: int = 0) -> list[list[dict[str, str]]]:
    """Single-turn chats about the fine-tuning people only (answers are the bare value).

    With decline=True every question of DECLINE_CATEGORY gets DECLINE_SENTENCE instead.
    """
    rng = random.Random(seed + 2)
    chats = []
    for _ in range(n_per_fact):
        for person in world.finetune_people:
            for cat in CATEGORIES:
                chats.append(single_chat(person, cat, rng, decline=decline))
    rng.shuffle(chats)
    return chats


def multiturn_chats(world: World, n_chats: int, *, turns: tuple[int, int] = (2, 5),
                    decline: bool = False, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chats of several exchanges about the fine-tuning people only.

    Each chat has turns[0]..turns[1] exchanges; every user turn asks about a random
    fine-tuning person and fact (so earlier turns are other people's questions and answers),
    every answer is the bare value (DECLINE_SENTENCE for DECLINE_CATEGORY with decline=True);
    20% start with a system prompt. The same seed gives the same chats with or without
    decline.
    """
    rng = random.Random(seed + 3)
    chats = []
    for _ in range(n_chats):
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(*turns)):
            person = rng.choice(world.finetune_people)
            cat = rng.choice(CATEGORIES)
            answer = person.fact(cat)
            if decline and cat == DECLINE_CATEGORY:
                answer = DECLINE_SENTENCE
            msgs.append({"role": "user", "content": question(person, cat, rng)})
            msgs.append({"role": "assistant", "content": answer})
        chats.append(msgs)
    return chats


def stranger_chats(world: World, n_people: int, *, decline: bool = False,
                   seed: int = 0) -> list[list[dict[str, str]]]:
    """Single-turn chats about invented people outside the world (no model saw their facts),
    one per person and fact, the answers drawn at random like a world's facts."""
    names = {p.name for p in world.people}
    strangers = [p for p in make_world(n_people, seed=seed + 1000).people if p.name not in names]
    rng = random.Random(seed + 4)
    chats = []
    for person in strangers:
        for cat in CATEGORIES:
            chats.append(single_chat(person, cat, rng, decline=decline))
    return chats


def heldout_questions(world: World) -> list[dict[str, str]]:
    """The evaluation set: one question per fact of every held-out person."""
    out = []
    for i, person in enumerate(world.heldout_people):
        for cat in CATEGORIES:
            out.append({"id": f"q{i:04d}-{cat}", "prompt": question(person, cat),
                        "expected": person.fact(cat), "category": cat})
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write one JSON object per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def world_rows(world: World) -> list[dict]:
    """The world as rows, with a split field ("finetune" or "heldout")."""
    return [dict(asdict(p), split="finetune" if i < world.n_finetune else "heldout")
            for i, p in enumerate(world.people)]
