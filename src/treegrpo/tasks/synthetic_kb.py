"""`synthetic-kb`: a seeded, invented world for multi-hop search questions.

Why invented: a tiny policy trained for minutes cannot know real-world facts, so every answer must come
from search; invented single-word names (one token each under a word-level tokenizer, SPEC §11) keep the
task learnable, and a seed makes the whole world, corpus and splits reproducible with no downloads.

The world has persons, companies, cities and countries linked by functional relations (each subject has
at most one object per relation), so every question built by chaining relations has exactly one answer.
One short document per entity states its relations; the entity's own name appears in every sentence of
its document and at most once in any other document, so a BM25 top-1 search for "<relation> of <name>"
returns that entity's document.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DATA_SOURCE = "synthetic-kb"

TYPES = ("person", "company", "city", "country")


@dataclass(frozen=True)
class Relation:
    """A functional relation: how it is stated, asked about and searched for."""

    name: str  # also the search keyword: the query is "<name> of <subject>"
    subject: str  # entity type
    object: str  # entity type
    phrase: str  # noun phrase about a subject, "{s}" stands for the subject phrase


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation("mother", "person", "person", "the mother of {s}"),
        Relation("employer", "person", "company", "the company that employs {s}"),
        Relation("birthplace", "person", "city", "the city where {s} was born"),
        Relation("founder", "company", "person", "the person who founded {s}"),
        Relation("headquarters", "company", "city", "the city where {s} is headquartered"),
        Relation("country", "city", "country", "the country that contains {s}"),
        Relation("capital", "country", "city", "the capital of {s}"),
        Relation("leader", "country", "person", "the leader of {s}"),
    )
}

# Words the templates use: generated names must never collide with them (case-insensitively).
_TEMPLATE_WORDS = {
    w.lower() for r in RELATIONS.values() for w in (r.phrase.replace("{s}", " ") + " " + r.name).split()
} | set(
    [
        "a",
        "an",
        "is",
        "who",
        "what",
        "of",
        "so",
        "the",
        "answer",
        "information",
        "says",
        "next",
        "need",
        "first",
        "find",
        "to",
        "i",
        "it",
        "many",
        "people",
        "know",
        "search",
        "think",
        "person",
        "company",
        "city",
        "country",
    ]
)

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "x", "th"]


def _make_name(rng: random.Random) -> str:
    syllables = rng.choice([2, 2, 3])
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


@dataclass
class Entity:
    name: str
    type: str
    relations: dict[str, str] = field(default_factory=dict)  # relation name -> object entity name


def _type_counts(n_entities: int) -> dict[str, int]:
    """Split the entity budget: many persons, fewer companies and cities, a handful of countries."""
    countries = max(2, round(n_entities * 0.04))
    cities = max(countries, round(n_entities * 0.16))
    companies = max(2, round(n_entities * 0.20))
    persons = n_entities - countries - cities - companies
    if persons < 4:
        raise ValueError(f"n_entities={n_entities} is too small; need at least 16")
    return {"person": persons, "company": companies, "city": cities, "country": countries}


def fact_sentence(relation: str, subject: str, obj: str) -> str:
    """How a fact is stated in documents and in the oracle's reasoning: "the mother of X is Y"."""
    return f"the {relation} of {subject} is {obj}"


def search_query(relation: str, subject: str) -> str:
    """The oracle's search query for one hop."""
    return f"{relation} of {subject}"


def question_text(start: str, path: Sequence[str]) -> str:
    """Nest relation phrases from the innermost (first hop) outwards."""
    phrase = start
    for rel in path:
        phrase = RELATIONS[rel].phrase.format(s=phrase)
    wh = "Who" if RELATIONS[path[-1]].object == "person" else "What"
    return f"{wh} is {phrase}?"


class SyntheticKB:
    """A seeded world: `corpus()`, `questions(split, n, hops)`, `oracle_steps(row)`, `make_demonstrations`."""

    def __init__(self, seed: int = 0, n_entities: int = 300, max_hops: int = 3, eval_fraction: float = 0.2):
        if max_hops < 1:
            raise ValueError(f"max_hops must be >= 1, got {max_hops}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        self.seed = seed
        self.n_entities = n_entities
        self.max_hops = max_hops
        self.eval_fraction = eval_fraction
        self.entities: dict[str, Entity] = {}
        self._build_world(random.Random(f"synthetic-kb/world/{seed}"))
        self._splits = self._build_questions()

    # ---- world -------------------------------------------------------------------------------
    def _build_world(self, rng: random.Random) -> None:
        counts = _type_counts(self.n_entities)
        names: set[str] = set()
        by_type: dict[str, list[str]] = {}
        for typ in TYPES:
            lst: list[str] = []
            while len(lst) < counts[typ]:
                name = _make_name(rng)
                if name in names or name.lower() in _TEMPLATE_WORDS:
                    continue
                names.add(name)
                lst.append(name)
                self.entities[name] = Entity(name, typ)
            by_type[typ] = lst
        persons, companies = by_type["person"], by_type["company"]
        cities, countries = by_type["city"], by_type["country"]
        # Every country gets at least one city (its capital comes from its own cities).
        for i, city in enumerate(cities):
            country = countries[i] if i < len(countries) else rng.choice(countries)
            self.entities[city].relations["country"] = country
        for country in countries:
            own = [c for c in cities if self.entities[c].relations["country"] == country]
            self.entities[country].relations["capital"] = rng.choice(own)
            self.entities[country].relations["leader"] = rng.choice(persons)
        for company in companies:
            self.entities[company].relations["founder"] = rng.choice(persons)
            self.entities[company].relations["headquarters"] = rng.choice(cities)
        # Mothers form a DAG: the first fifth of persons are elders with no recorded mother.
        n_elders = max(1, len(persons) // 5)
        for i, person in enumerate(persons):
            rel = self.entities[person].relations
            if i >= n_elders:
                rel["mother"] = persons[rng.randrange(i)]
            rel["employer"] = rng.choice(companies)
            rel["birthplace"] = rng.choice(cities)

    def by_type(self, typ: str) -> list[str]:
        return [e.name for e in self.entities.values() if e.type == typ]

    def document(self, name: str) -> dict[str, str]:
        """One short document per entity; the name is in every sentence so its own doc ranks first."""
        e = self.entities[name]
        sentences = [f"{name} is a {e.type}."]
        for rel, obj in e.relations.items():
            s = fact_sentence(rel, name, obj)
            sentences.append(s[0].upper() + s[1:] + ".")
        if len(sentences) < 3:
            sentences.append(f"Many people know {name}.")
        return {"id": f"kb-{self.seed}-{name.lower()}", "title": name, "text": " ".join(sentences)}

    def corpus(self) -> list[dict[str, str]]:
        return [self.document(name) for name in self.entities]

    # ---- questions ---------------------------------------------------------------------------
    def _chains(self, hops: int) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """All (start, relation path, entity chain) of exactly `hops` hops with distinct entities."""
        out: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []

        def walk(chain: list[str], path: list[str]) -> None:
            if len(path) == hops:
                out.append((chain[0], tuple(path), tuple(chain)))
                return
            for rel, obj in self.entities[chain[-1]].relations.items():
                if obj not in chain:  # distinct entities: every hop is a genuine new search
                    walk(chain + [obj], path + [rel])

        for name in self.entities:
            walk([name], [])
        return out

    def _build_questions(self) -> dict[str, dict[int, list[dict[str, Any]]]]:
        splits: dict[str, dict[int, list[dict[str, Any]]]] = {"train": {}, "eval": {}}
        index = 0
        for hops in range(1, self.max_hops + 1):
            chains = self._chains(hops)
            random.Random(f"synthetic-kb/split/{self.seed}/{hops}").shuffle(chains)
            n_eval = max(1, round(len(chains) * self.eval_fraction)) if len(chains) > 1 else 0
            for pos, (start, path, chain) in enumerate(chains):
                split = "eval" if pos < n_eval else "train"
                row = {
                    "question": question_text(start, path),
                    "golden_answers": [chain[-1]],
                    "data_source": DATA_SOURCE,
                    "index": index,
                    "group_id": f"{DATA_SOURCE}/s{self.seed}/{index}",
                    "hops": hops,
                    "split": split,
                    "path": list(path),
                    "chain": list(chain),
                    "distractor": self._distractor(chain),
                }
                index += 1
                splits[split].setdefault(hops, []).append(row)
        return splits

    @staticmethod
    def _distractor(chain: Sequence[str]) -> str:
        """The other name of the last retrieved fact ("the R of S is O": S instead of O).

        What a planted late mistake answers instead of the gold: a name the agent did retrieve, as easy
        to copy as the gold, so a warm start imitates the mistake instead of averaging it away.
        """
        return chain[-2]

    def count(self, split: str, hops: int) -> int:
        return len(self._splits.get(split, {}).get(hops, []))

    def questions(
        self, split: str = "train", n: int | None = None, hops: int | Iterable[int] | None = None
    ) -> list[dict[str, Any]]:
        """Up to `n` rows of `split`, interleaving the requested hop counts so difficulty is balanced."""
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        wanted = (
            range(1, self.max_hops + 1) if hops is None else [hops] if isinstance(hops, int) else list(hops)
        )
        for h in wanted:
            if not 1 <= h <= self.max_hops:
                raise ValueError(f"hops={h} is outside 1..max_hops={self.max_hops}")
        return interleave([self._splits[split].get(h, []) for h in wanted], n)

    def oracle_steps(self, row: Mapping[str, Any]) -> list[str]:
        return oracle_steps(row)

    def make_demonstrations(
        self,
        rows: Sequence[Mapping[str, Any]],
        early_stop_prob: float = 0.0,
        rng: random.Random | None = None,
        guess_prob: float = 0.0,
        distractor_prob: float = 0.0,
    ) -> list[Demonstration]:
        return make_demonstrations(
            rows, early_stop_prob, rng, guess_prob=guess_prob, distractor_prob=distractor_prob
        )


# ---- demonstrations: pure functions of a row (any task whose rows carry a plan, or path + chain) ------


def interleave(pools: Sequence[Sequence[Mapping[str, Any]]], n: int | None) -> list[dict[str, Any]]:
    """Round-robin over per-hop pools (copies), so any prefix of the result is balanced in difficulty."""
    out: list[dict[str, Any]] = []
    depth = 0
    while (n is None or len(out) < n) and any(depth < len(p) for p in pools):
        for p in pools:
            if depth < len(p) and (n is None or len(out) < n):
                out.append(dict(p[depth]))
        depth += 1
    return out


@dataclass
class Demonstration:
    """Step texts for one question in the agent protocol; `correct` says whether it ends on the gold."""

    row: dict[str, Any]
    steps: list[str]
    early_stop: bool = False
    correct: bool = True
    mistake: str = ""  # planted mistake: "" (none), "early_stop", "guess" (depth 0), "distractor" (last step)


def row_plan(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The row's hops as {"need", "query", "fact", "value"}: given as "plan", or derived from path/chain."""
    plan = row.get("plan")
    if plan:
        for hop in plan:
            if not all(isinstance(hop.get(k), str) for k in ("need", "query", "fact", "value")):
                raise ValueError(
                    f"row {row.get('index', '?')}: each plan hop needs need/query/fact/value strings"
                )
        return [dict(h) for h in plan]
    path, chain = row.get("path"), row.get("chain")
    if not path or not chain or len(chain) != len(path) + 1:
        raise ValueError(
            f"row {row.get('index', '?')}: oracle needs 'plan', or 'path' (relations) and 'chain' "
            "(len(path)+1 entities)"
        )
    for rel in path:
        if rel not in RELATIONS:
            raise ValueError(f"row {row.get('index', '?')}: unknown relation {rel!r} in 'path'")
    return [
        {
            "need": RELATIONS[rel].phrase.format(s=chain[i]),
            "query": search_query(rel, chain[i]),
            "fact": fact_sentence(rel, chain[i], chain[i + 1]),
            "value": chain[i + 1],
        }
        for i, rel in enumerate(path)
    ]


def render_steps(plan: Sequence[Mapping[str, str]], searches: int) -> list[str]:
    """`searches` search steps along the plan, then an answer with the value reached so far.

    Each step is "<think> short reasoning </think>\\n<search> query </search>", the last one
    "<think> ... </think>\\n<answer> X </answer>": the think span gives steps real length (SPEC §11).
    """
    if not 1 <= searches <= len(plan):
        raise ValueError(f"searches must be in 1..{len(plan)}, got {searches}")
    steps = []
    for i in range(searches):
        if i == 0:
            think = f"To answer, I first need to find {plan[0]['need']}."
        else:
            think = f"The information says {plan[i - 1]['fact']}. Next I need to find {plan[i]['need']}."
        steps.append(f"<think> {think} </think>\n<search> {plan[i]['query']} </search>")
    last = plan[searches - 1]
    think = f"The information says {last['fact']}. So the answer is {last['value']}."
    steps.append(f"<think> {think} </think>\n<answer> {last['value']} </answer>")
    return steps


def oracle_steps(row: Mapping[str, Any]) -> list[str]:
    """The correct demonstration: one search per hop, then the answer."""
    plan = row_plan(row)
    return render_steps(plan, len(plan))


def guess_steps(row: Mapping[str, Any]) -> list[str]:
    """The planted early mistake: answer at the first step without searching (the question's own name)."""
    plan = row_plan(row)
    guess = row.get("chain", [None])[0] or plan[0]["value"]
    return [
        f"<think> I think I know {plan[-1]['need']}. So the answer is {guess}. </think>\n<answer> {guess} </answer>"
    ]


def distractor_steps(row: Mapping[str, Any]) -> list[str]:
    """The planted late mistake: every search right, then the other name of the last document answered."""
    plan = row_plan(row)
    steps = render_steps(plan, len(plan))
    wrong = str(row.get("distractor") or plan[-1]["value"])
    last = plan[-1]
    think = f"The information says {last['fact']}. So the answer is {wrong}."
    steps[-1] = f"<think> {think} </think>\n<answer> {wrong} </answer>"
    return steps


def make_demonstrations(
    rows: Sequence[Mapping[str, Any]],
    early_stop_prob: float = 0.0,
    rng: random.Random | None = None,
    guess_prob: float = 0.0,
    distractor_prob: float = 0.0,
) -> list[Demonstration]:
    """Warm-start demos; with prob. `early_stop_prob` a multi-hop demo stops one hop early.

    Why imperfect: RL can only improve on mistakes that sampling sometimes avoids (SPEC §11). A model
    trained on a mix of full and one-hop-short demos still issues the last search some of the time, so
    the tree's sibling comparison has both outcomes to learn from. One-hop questions are never cut.

    Planted decisions (for measuring credit by depth): with prob. `guess_prob` a demo answers at its
    first step without searching (a mistake at step depth 0, "whether to search at all"); with prob.
    `distractor_prob` a full demo answers the other name of the last retrieved document (a mistake at
    the last step, "which of two retrieved names"). The three mistakes are exclusive per demo.
    """
    for name, p in (
        ("early_stop_prob", early_stop_prob),
        ("guess_prob", guess_prob),
        ("distractor_prob", distractor_prob),
    ):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if guess_prob + distractor_prob > 1.0:
        raise ValueError(f"guess_prob + distractor_prob must be <= 1, got {guess_prob + distractor_prob}")
    rng = rng or random.Random(0)
    demos = []
    for row in rows:
        plan = row_plan(row)
        if guess_prob or distractor_prob:
            u = rng.random()
            if u < guess_prob:
                demos.append(Demonstration(dict(row), guess_steps(row), correct=False, mistake="guess"))
                continue
            if u < guess_prob + distractor_prob:
                demos.append(
                    Demonstration(dict(row), distractor_steps(row), correct=False, mistake="distractor")
                )
                continue
        cut = len(plan) >= 2 and rng.random() < early_stop_prob
        searches = len(plan) - 1 if cut else len(plan)
        demos.append(
            Demonstration(
                dict(row),
                render_steps(plan, searches),
                early_stop=cut,
                correct=not cut,
                mistake="early_stop" if cut else "",
            )
        )
    return demos
