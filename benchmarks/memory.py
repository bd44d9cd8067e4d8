"""How large a tree can be trained before memory is the bottleneck: peak memory and time against tree size.

    python benchmarks/memory.py --json                 # the sweep below, cap 512 MB
    python benchmarks/memory.py --json --quick         # smaller (a smoke run, same keys)

A tree here: a `--prompt`-token prompt, then `leaves` root→leaf paths of `depth` steps (each step `step`
generated + `step // 2` observation tokens), branching from random internal nodes like Tree-GRPO's
expansions, so every path has the same length. Two trees per batch (one with half the leaves). One
forward + backward of the loss (reference defaults, β = 0.001 against a second model) per point, on a tiny
random Llama (hidden 128, 4 layers, vocabulary 4096).

For each mode (`leaf`, `tree` = one row per tree, `tree_rows` = both trees in one row, `path`) a list of
`{tree_tokens, leaves, depth, step, peak_mb, seconds, seconds_per_trained_token}` (tree_tokens = unique
tokens of the batch; trained tokens counted per leaf), over two sweeps: leaves 2 → 16 at a fixed path
length (`path` should stay flat), and step length doubling at 8 leaves until the cap or `--max-step`.
`largest_under_cap` gives, per mode, the largest batch (unique tokens) that ran under `--cap-mb`.
Peak memory: see `peak_memory.py` (CPU: resident high-water mark delta, the script re-runs itself with
`MALLOC_MMAP_THRESHOLD_=65536`, which also adds page-fault time to `seconds`; GPU: max allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak_memory  # noqa: E402
from treegrpo.loss import LossConfig  # noqa: E402
from treegrpo.models import tiny_causal_lm  # noqa: E402
from treegrpo.packing import forward_logprobs, loss_token_totals, pack, packed_loss  # noqa: E402
from treegrpo.tokenizer import train_tokenizer  # noqa: E402
from treegrpo.tree import Tree  # noqa: E402

MODES = ("leaf", "tree", "tree_rows", "path")


def fixed_depth_tree(
    rng: random.Random, vocab: int, index: int, prompt: int, depth: int, leaves: int, step: int
) -> Tree:
    """`leaves` paths of exactly `depth` steps: a first chain, then chains from random internal nodes."""
    t = Tree.new("mem", index, [rng.randrange(vocab) for _ in range(prompt)])

    def chain(node: int) -> None:
        while t.nodes[node].depth < depth:
            last = t.nodes[node].depth + 1 == depth
            node = t.add_child(
                node,
                token_ids=[rng.randrange(vocab) for _ in range(step)],
                logprobs=[-rng.random() * 2 for _ in range(step)],
                obs_ids=[] if last else [rng.randrange(vocab) for _ in range(step // 2)],
                is_leaf=last,
            ).id

    chain(0)
    while len(t.leaves()) < leaves:
        chain(rng.choice([n.id for n in t.internal_nodes()]))
    return t


def measure(model, ref, trees: list[Tree], mode: str, device: torch.device) -> dict[str, Any]:  # noqa: ANN001
    rng = random.Random(0)
    adv = [rng.gauss(0.0, 1.0) for _ in range(sum(len(t.leaves()) for t in trees))]
    cfg = LossConfig()
    packing = "tree" if mode == "tree_rows" else mode
    budget = sum(len(t.nodes[0].all_ids) + sum(len(n.all_ids) for n in t.nodes[1:]) for t in trees)
    batch = pack(trees, adv, packing, max_tokens_per_row=budget if mode == "tree_rows" else 0)  # type: ignore[arg-type]

    def step() -> float:
        with torch.no_grad():
            ref_lp = forward_logprobs(ref, batch, compute_entropy=False)[0]
        model.zero_grad(set_to_none=True)
        loss, _ = packed_loss(model, batch, cfg, ref_lp)
        loss.backward()
        return loss.item()

    t0 = time.perf_counter()
    peak, _ = peak_memory.peak_mb(step, device)
    seconds = time.perf_counter() - t0
    trained, _ = loss_token_totals(trees)
    return {
        "tree_tokens": int(pack(trees, adv, "tree").num_forward_tokens),
        "leaves": len(adv),
        "peak_mb": round(peak, 1),
        "seconds": round(seconds, 4),
        "seconds_per_trained_token": seconds / max(trained, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, same keys)")
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--step", type=int, default=100)
    ap.add_argument("--leaves", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--max-step", type=int, default=800)
    ap.add_argument("--cap-mb", type=float, default=512.0)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if not torch.cuda.is_available() and not peak_memory.allocator_ready():
        # CPU figures need every tensor to be its own mapping (see peak_memory.py): run again with it.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **peak_memory.ALLOCATOR_ENV})
    if a.quick:
        a.prompt, a.step, a.max_step, a.leaves, a.cap_mb = 20, 10, 20, [2, 4], 16.0
    if a.threads:
        torch.set_num_threads(a.threads)
    peak_memory._libc()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = train_tokenizer([" ".join(f"w{i}" for i in range(2000))], vocab_size=4096)
    hidden, layers = (32, 1) if a.quick else (128, 4)
    model = tiny_causal_lm(tok, hidden=hidden, layers=layers, max_positions=8192).to(device)
    ref = tiny_causal_lm(tok, hidden=hidden, layers=layers, seed=1, max_positions=8192).to(device)
    vocab = len(tok)

    def batch(leaves: int, step: int) -> list[Tree]:
        rng = random.Random(leaves * 1000 + step)
        return [
            fixed_depth_tree(rng, vocab, 0, a.prompt, a.depth, leaves, step),
            fixed_depth_tree(rng, vocab, 1, a.prompt, a.depth, max(1, leaves // 2), step),
        ]

    for mode in a.modes:  # warm-up (first-call allocations) on the smallest point
        measure(model, ref, batch(a.leaves[0], a.step), mode, device)
    out: dict[str, Any] = {"modes": {m: [] for m in a.modes}, "leaf_sweep": {}, "largest_under_cap": {}}
    for mode in a.modes:
        for leaves in a.leaves:
            point = {
                **measure(model, ref, batch(leaves, a.step), mode, device),
                "depth": a.depth,
                "step": a.step,
            }
            out["modes"][mode].append(point)
        flat = [p["peak_mb"] for p in out["modes"][mode]]
        out["leaf_sweep"][mode] = {
            "leaves": [p["leaves"] for p in out["modes"][mode]],
            "peak_mb": flat,
            "peak_ratio_last_over_first": round(flat[-1] / max(flat[0], 1e-9), 3),
        }
        step = a.step * 2
        fits = [p for p in out["modes"][mode] if p["peak_mb"] <= a.cap_mb]
        while step <= a.max_step:
            p = {
                **measure(model, ref, batch(8 if not a.quick else 2, step), mode, device),
                "depth": a.depth,
                "step": step,
            }
            out["modes"][mode].append(p)
            if p["peak_mb"] > a.cap_mb:
                break
            fits.append(p)
            step *= 2
        best = max(fits, key=lambda p: p["tree_tokens"]) if fits else None
        out["largest_under_cap"][mode] = (
            {
                "tree_tokens": best["tree_tokens"],
                "leaves": best["leaves"],
                "step": best["step"],
                "peak_mb": best["peak_mb"],
            }
            if best
            else None
        )
    out.update(
        cap_mb=a.cap_mb,
        device=str(device),
        threads=torch.get_num_threads(),
        memory_method=peak_memory.method(device),
        model={"hidden": hidden, "layers": layers, "vocab": vocab},
        prompt=a.prompt,
    )
    if a.json:
        print(json.dumps(out))
    else:
        for mode, pts in out["modes"].items():
            print(mode)
            for p in pts:
                print(
                    f"  tokens {p['tree_tokens']:>6} leaves {p['leaves']:>3} step {p['step']:>4}: {p['peak_mb']:>8} MB  {p['seconds']} s"
                )
        print("largest under cap:", out["largest_under_cap"])


if __name__ == "__main__":
    main()
