"""Long-running fuzzer for everything that reads model output: parser, environment step, rewards.

    python scripts/fuzz.py --seconds 600 [--seed 0] [--max-len 100000]

Generates strings for ``--seconds`` (binary junk with lone surrogates, arbitrary code points, tag
soup with nested / unbalanced / unknown tags, long repetitions up to ``--max-len`` characters, and
mutations of well-formed trajectories), feeds each one to ``parse_step``, ``extract_answer``,
``is_valid_format``, ``em_format_score``, ``f1_format_score`` and ``SearchR1Env.step`` (over a BM25
retriever, and over one that fails in rotating ways), and checks that each returns a defined,
well-typed result. Prints one JSON summary; exit code 1 if any input raised or broke an invariant
(the first failing inputs are saved with ``--save-failures DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from treegrpo.envs.parsing import parse_step
from treegrpo.envs.search_r1 import SearchR1Env, SearchState
from treegrpo.retrievers import BM25Retriever
from treegrpo.rewards import em_format_score, extract_answer, f1_format_score, is_valid_format
from treegrpo.tree import ActionKind

EM_TABLE = {0.0, 0.1, 0.2, 0.8, 1.0}
TAGS = [
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
    "<answer >",
    "</answer",
    "<ANSWER>",
    "<tool_call>",
    "</foo>",
    "<",
    ">",
    "</",
    "\x00",
    "\ufeff",
    "\u202e",
    "\n",
]
WORDS = ["Paris", "the", "42", "capital", "France", "東京", "Zürich", " ", "\t"]
GOLDS = [["Paris"], ["42", "forty-two"], ["the Paris"], [""], ["東京"]]
DOCS = [
    {"id": "0", "title": "Paris", "text": "Paris is the capital of France."},
    {"id": "1", "title": "Answer", "text": "The answer to everything is 42."},
    {"id": "2", "title": "Tags", "text": "<answer> not an answer </answer> <search> x </search>"},
]
VALID = (
    "<think> t </think><search> capital of France </search>"
    "<information>Doc 1(Title: Paris) Paris</information><think> ok </think><answer> Paris </answer>"
)


class Exploding:
    """Fails in a different way on each call (exception, non-list, wrong length, timeout)."""

    def __init__(self) -> None:
        self.calls = 0

    def search(self, queries: list[str], topk: int) -> Any:
        self.calls += 1
        mode = self.calls % 4
        if mode == 0:
            raise RuntimeError("backend down")
        if mode == 1:
            return None
        if mode == 2:
            return [[]] * (len(queries) + 1)
        raise TimeoutError("slow")


def gen_string(rng: random.Random, max_len: int) -> tuple[str, str]:
    """(family, string) drawn from one of the junk families."""
    family = rng.choice(["binary", "codepoints", "tags", "nested", "long", "mutated"])
    if family == "binary":
        s = rng.randbytes(rng.randint(0, 400)).decode("utf-8", errors="surrogateescape")
    elif family == "codepoints":
        s = "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 200)))
    elif family == "tags":
        s = "".join(
            rng.choice(TAGS) if rng.random() < 0.5 else rng.choice(WORDS) for _ in range(rng.randint(0, 60))
        )
    elif family == "nested":
        s = rng.choice(WORDS)
        for _ in range(rng.randint(1, 30)):
            tag = rng.choice(["think", "search", "answer", "information", "x"])
            s = f"<{tag}>{s}</{tag}>" if rng.random() < 0.8 else f"<{tag}>{s}"
    elif family == "long":
        piece = "".join(rng.choice(TAGS + WORDS) for _ in range(rng.randint(1, 6)))
        n = rng.randint(1, max_len)
        s = (piece * (n // len(piece) + 1))[:n]
    else:
        chars = list(VALID)
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            i = rng.randrange(len(chars) + 1)
            if op < 0.4 and chars:
                del chars[min(i, len(chars) - 1)]
            elif op < 0.8:
                chars.insert(i, rng.choice(TAGS + WORDS))
            else:
                chars[i:i] = chars[: rng.randint(0, len(chars))]
        s = "".join(chars)
    return family, s


def check_one(s: str, golds: list[str], env: SearchR1Env, bad_env: SearchR1Env) -> Counter[str]:
    """Run every consumer of model output on `s`; AssertionError on a broken invariant."""
    seen: Counter[str] = Counter()
    p = parse_step(s)
    assert p.kind in ("search", "answer", "invalid") and s.startswith(p.cut_text)
    ans = extract_answer(s)
    assert ans is None or ans in s
    valid = is_valid_format(s)
    assert isinstance(valid, bool) and (not valid or ans is not None)
    em = em_format_score(s, golds)
    assert em in EM_TABLE, em
    f1 = f1_format_score(s, golds)
    assert math.isfinite(f1) and 0.0 <= f1 <= 1.0, f1
    seen[f"em_format={em}"] += 1
    for e in (env, bad_env):
        for turns in (0, e.max_turns):
            state = SearchState("What is the capital of France?", tuple(golds), turns=turns)
            (r,) = e.step([state], [s])
            assert isinstance(r.action, ActionKind) and isinstance(r.observation, str)
            assert r.state.response.startswith(s)
            if r.done:
                assert e.reward(r.state) in EM_TABLE
            seen[f"action={r.action.value}"] += 1
            seen["tool_failures"] += r.tool_failures
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=100_000, help="longest generated string")
    ap.add_argument("--save-failures", help="directory for the first 20 failing inputs")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    env = SearchR1Env(BM25Retriever(docs=DOCS), max_turns=2, topk=2, max_obs_tokens=40)
    bad_env = SearchR1Env(Exploding(), max_turns=2, topk=1, max_obs_tokens=40)
    families: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    longest = 0
    total_chars = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        family, s = gen_string(rng, args.max_len)
        families[family] += 1
        longest = max(longest, len(s))
        total_chars += len(s)
        try:
            outcomes.update(check_one(s, rng.choice(GOLDS), env, bad_env))
        except Exception as e:  # noqa: BLE001 - a fuzzer records every failure and carries on
            failures.append({"family": family, "error": f"{type(e).__name__}: {e}", "input": s})
            if args.save_failures and len(failures) <= 20:
                d = Path(args.save_failures)
                d.mkdir(parents=True, exist_ok=True)
                (d / f"failure-{len(failures):02d}.txt").write_text(
                    s + "\n---\n" + traceback.format_exc(), encoding="utf-8", errors="surrogateescape"
                )
    summary = {
        "seconds": round(time.perf_counter() - t0, 2),
        "seed": args.seed,
        "inputs": sum(families.values()),
        "env_steps": sum(v for k, v in outcomes.items() if k.startswith("action=")),
        "families": dict(sorted(families.items())),
        "longest_input_chars": longest,
        "total_chars": total_chars,
        "outcomes": dict(sorted(outcomes.items())),
        "failures": len(failures),
        "first_failures": [{**f, "input": f["input"][:200]} for f in failures[:5]],
    }
    print(json.dumps(summary, indent=2, ensure_ascii=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
