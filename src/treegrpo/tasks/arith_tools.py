"""`arith-tools`: two-step arithmetic with a calculator, on the native tool-calling protocol.

Each question is ``What is (a * b) + c ?`` (the parenthesis puts ``a`` at a word start, so a
word-level tokenizer gives it the same token in the question and in the JSON call). The oracle calls ``calculator("a * b")``, then
``calculator("<result> + c")`` with the first result copied from the tool message, then answers
``<answer>value</answer>``. Like synthetic-kb's demonstrations, a share of them (``early_stop_prob``)
stop one call early and answer the intermediate product, so RL has something to fix. It pairs with
``env.name: tools`` and ``env.kwargs.tools: [calculator]`` (the ``calculator`` preset).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

DATA_SOURCE = "arith-tools"
MAX_NUMBER = 999


def _row(a: int, b: int, c: int, index: int, split: str) -> dict[str, Any]:
    return {
        "question": f"What is ({a} * {b}) + {c} ?",
        "golden_answers": [str(a * b + c)],
        "data_source": DATA_SOURCE,
        "index": index,
        "group_id": f"{DATA_SOURCE}/{index}",
        "split": split,
        "operands": [a, b, c],
    }


def make_rows(
    seed: int = 0, n_train: int = 1000, n_eval: int = 200, max_factor: int = 9, max_addend: int = 20
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint train / held-out questions (no (a, b, c) triple in both)."""
    if max_factor * max_factor + max_addend > MAX_NUMBER:
        raise ValueError(f"max_factor² + max_addend must stay <= {MAX_NUMBER}")
    triples = [
        (a, b, c)
        for a in range(2, max_factor + 1)
        for b in range(2, max_factor + 1)
        for c in range(2, max_addend + 1)
    ]
    if n_train + n_eval > len(triples):
        raise ValueError(f"only {len(triples)} distinct questions; asked for {n_train + n_eval}")
    random.Random(seed).shuffle(triples)
    evals = [_row(*t, index=i, split="eval") for i, t in enumerate(triples[:n_eval])]
    train = [
        _row(*t, index=n_eval + i, split="train") for i, t in enumerate(triples[n_eval : n_eval + n_train])
    ]
    return train, evals


def _call(expression: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        ],
    }


def oracle_messages(row: Mapping[str, Any], early_stop: bool = False) -> list[dict[str, Any]]:
    """The assistant turns of a demonstration (tool messages are replayed by the environment)."""
    a, b, c = row["operands"]
    first = _call(f"{a} * {b}")
    if early_stop:
        return [first, {"role": "assistant", "content": f"<answer>{a * b}</answer>"}]
    # no spaces inside the answer tags: the number is then the same word-level token as in the tool message
    return [
        first,
        _call(f"{a * b} + {c}"),
        {"role": "assistant", "content": f"<answer>{a * b + c}</answer>"},
    ]


def demonstrations(
    rows: Sequence[Mapping[str, Any]], early_stop_prob: float = 0.0, seed: int = 0
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for row in rows:
        early = rng.random() < early_stop_prob
        out.append(
            {
                "row": dict(row),
                "messages": oracle_messages(row, early),
                "early_stop": early,
                "correct": not early,
            }
        )
    return out


def number_corpus() -> list[dict[str, str]]:
    """Every number a result can be, as one document: the word-level tokenizer learns them all."""
    return [{"id": "numbers", "title": "numbers", "text": " ".join(str(i) for i in range(MAX_NUMBER + 1))}]


__all__ = ["DATA_SOURCE", "demonstrations", "make_rows", "number_corpus", "oracle_messages"]
