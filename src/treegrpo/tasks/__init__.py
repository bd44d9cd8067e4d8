"""Built-in tasks: a corpus, train / held-out question rows, and demonstrations for warm-start SFT.

`build_task(name, **kw)` returns a :class:`Task`; more tasks can be added with `register_task`. Rows are
dicts {"question", "golden_answers", "data_source", "index", "group_id", "hops", "split", ...} — what
`SearchR1Env.start` reads — and held-out rows are never in the train split.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from treegrpo.tasks.synthetic_kb import (
    Demonstration,
    SyntheticKB,
    make_demonstrations,
    oracle_steps,
    render_steps,
    row_plan,
)


@dataclass
class Task:
    """What a training run needs from a task; `source` is the generator object (world, factbook)."""

    name: str
    corpus: list[dict[str, str]]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    source: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    planted: dict[str, float] = field(default_factory=dict)  # planted warm-start mistakes (guess_prob, ...)

    def demonstrations(
        self,
        rows: Sequence[Mapping[str, Any]] | None = None,
        n: int | None = None,
        early_stop_prob: float = 0.0,
        seed: int = 0,
    ) -> list[Demonstration]:
        """Oracle demos for `rows` (default: the train rows, first `n`), some cut one hop early.

        Demos are only ever built from the rows given; the default never touches `eval_rows`.
        """
        rows = list(self.train_rows if rows is None else rows)
        if n is not None:
            rows = rows[:n]
        return make_demonstrations(
            rows, early_stop_prob=early_stop_prob, rng=random.Random(seed), **self.planted
        )


def _hops_list(hops: int | Sequence[int] | None, max_hops: int) -> list[int]:
    if hops is None:
        return list(range(1, max_hops + 1))
    return [hops] if isinstance(hops, int) else list(hops)


def _build_synthetic_kb(
    seed: int = 0,
    n_entities: int = 300,
    max_hops: int = 3,
    n_train: int | None = None,
    n_eval: int | None = 200,
    train_hops: int | Sequence[int] | None = None,
    eval_hops: int | Sequence[int] | None = None,
    eval_fraction: float = 0.2,
    guess_prob: float = 0.0,
    distractor_prob: float = 0.0,
) -> Task:
    """`guess_prob` / `distractor_prob` plant warm-start mistakes at known depths (see make_demonstrations)."""
    for name, p in (("guess_prob", guess_prob), ("distractor_prob", distractor_prob)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if guess_prob + distractor_prob > 1.0:
        raise ValueError("guess_prob + distractor_prob must be <= 1")
    kb = SyntheticKB(seed=seed, n_entities=n_entities, max_hops=max_hops, eval_fraction=eval_fraction)
    train = kb.questions("train", n_train, _hops_list(train_hops, max_hops))
    evals = kb.questions("eval", n_eval, _hops_list(eval_hops, max_hops))
    info = {
        "n_entities": n_entities,
        "entities_by_type": {t: len(kb.by_type(t)) for t in ("person", "company", "city", "country")},
        "questions_per_hop": {
            s: {h: kb.count(s, h) for h in range(1, max_hops + 1)} for s in ("train", "eval")
        },
    }
    planted = {
        k: float(v) for k, v in (("guess_prob", guess_prob), ("distractor_prob", distractor_prob)) if v
    }
    return Task("synthetic-kb", kb.corpus(), train, evals, source=kb, info=info, planted=planted)


def _build_factbook(
    seed: int = 0,
    n_train: int | None = None,
    n_eval: int | None = 200,
    train_hops: int | Sequence[int] | None = None,
    eval_hops: int | Sequence[int] | None = None,
    eval_fraction: float = 0.2,
) -> Task:
    from treegrpo.tasks.factbook import Factbook  # imports the data package only when asked for

    fb = Factbook(seed=seed, eval_fraction=eval_fraction)
    train = fb.questions("train", n_train, _hops_list(train_hops, 2))
    evals = fb.questions("eval", n_eval, _hops_list(eval_hops, 2))
    info = {
        "n_countries": len(fb.countries),
        "questions_per_hop": {s: {h: fb.count(s, h) for h in (1, 2)} for s in ("train", "eval")},
    }
    return Task("factbook", fb.corpus(), train, evals, source=fb, info=info)


class ArithToolsTask(Task):
    """`arith-tools`: demonstrations are chat messages with tool calls (rendered by the tools env)."""

    def demonstrations(  # type: ignore[override]
        self,
        rows: Sequence[Mapping[str, Any]] | None = None,
        n: int | None = None,
        early_stop_prob: float = 0.0,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        from treegrpo.tasks.arith_tools import demonstrations

        rows = list(self.train_rows if rows is None else rows)
        return demonstrations(rows[:n] if n is not None else rows, early_stop_prob, seed)


def _build_arith_tools(
    seed: int = 0, n_train: int = 1000, n_eval: int = 200, max_factor: int = 9, max_addend: int = 20
) -> Task:
    from treegrpo.tasks.arith_tools import make_rows, number_corpus

    train, evals = make_rows(seed, n_train, n_eval, max_factor, max_addend)
    info = {"n_train": len(train), "n_eval": len(evals), "protocol": "tools (calculator)"}
    return ArithToolsTask("arith-tools", number_corpus(), train, evals, info=info)


TASKS: dict[str, Callable[..., Task]] = {
    "synthetic-kb": _build_synthetic_kb,
    "factbook": _build_factbook,
    "arith-tools": _build_arith_tools,
}


def register_task(name: str, builder: Callable[..., Task]) -> None:
    """Add a task builder under `name` (e.g. from a plugin); an existing name is replaced."""
    TASKS[name] = builder


def build_task(name: str, **kw: Any) -> Task:
    """Build a registered task; unknown names and bad options raise ValueError naming them."""
    try:
        builder = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
    try:
        inspect.signature(builder).bind(**kw)
    except TypeError as e:
        raise ValueError(f"task {name!r}: {e}") from None
    return builder(**kw)


__all__ = [
    "TASKS",
    "Demonstration",
    "SyntheticKB",
    "Task",
    "build_task",
    "make_demonstrations",
    "oracle_steps",
    "register_task",
    "render_steps",
    "row_plan",
]
