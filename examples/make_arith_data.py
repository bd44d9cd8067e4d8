"""Regenerate examples/arith/*.jsonl (the calculator plug-in example's data and demonstrations)."""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "arith"


def rows(rng: random.Random, n: int, start: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        out.append(
            {
                "id": f"arith-{start + i}",
                "question": f"What is {a} * {b} ?",
                "golden_answers": [str(a * b)],
                "expr": f"{a} * {b}",
            }
        )
    return out


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(exist_ok=True)
    train, evals = rows(rng, 300, 0), rows(rng, 50, 300)
    seen = {r["question"] for r in train}
    evals = [r for r in evals if r["question"] not in seen]
    for name, data in (("train", train), ("eval", evals)):
        with (OUT / f"{name}.jsonl").open("w") as f:
            for r in data:
                f.write(json.dumps({k: v for k, v in r.items() if k != "expr"}) + "\n")
    with (OUT / "demos.jsonl").open("w") as f:
        for r in train[:200]:
            steps = [f" <calc> {r['expr']} </calc>", f" <answer> {r['golden_answers'][0]} </answer>"]
            row = {k: v for k, v in r.items() if k != "expr"}
            f.write(json.dumps({**row, "steps": steps}) + "\n")


if __name__ == "__main__":
    main()
