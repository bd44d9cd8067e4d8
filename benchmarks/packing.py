"""Tree vs leaf packing: forwarded tokens, forward+backward wall time and exactness on (M, N, L)-shaped trees.

    python benchmarks/packing.py --json

Same tiny random model, same random trees (Tree-GRPO default (2, 2, 1): 2 trees per prompt, each a full
chain plus 2 expansions from random nodes), realistic lengths (200-token prompt, up to 3 steps of ~100
generated + 50 observation tokens). Both packings are timed side by side, alternating, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from treegrpo.loss import LossConfig
from treegrpo.models import tiny_causal_lm
from treegrpo.packing import forward_logprobs, pack, packed_loss
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import Tree


def make_tree(rng: random.Random, vocab: int, index: int, args: argparse.Namespace) -> Tree:
    """One chain of `steps` steps, then `n` expansions per iteration from random non-leaf nodes."""
    t = Tree.new("bench", index, [rng.randrange(vocab) for _ in range(args.prompt)])

    def step(parent: int, depth: int) -> int:
        gen = max(1, int(rng.gauss(args.gen, args.gen * 0.2)))
        last = depth == args.steps
        node = t.add_child(
            parent,
            token_ids=[rng.randrange(vocab) for _ in range(gen)],
            logprobs=[-rng.random() * 2 for _ in range(gen)],
            obs_ids=[] if last else [rng.randrange(vocab) for _ in range(args.obs)],
            is_leaf=last,
        )
        return node.id

    def run_from(node_id: int) -> None:
        cur = node_id
        while not t.nodes[cur].is_leaf:
            cur = step(cur, t.nodes[cur].depth + 1)

    run_from(0)
    for _ in range(args.l):
        points = [rng.choice([n.id for n in t.internal_nodes()]) for _ in range(args.n)]  # with replacement
        for p in points:
            run_from(p)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--l", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--gen", type=int, default=100)
    ap.add_argument("--obs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss-agg-mode", default="token-mean")
    args = ap.parse_args()

    tok = train_tokenizer([" ".join(f"w{i}" for i in range(2000))], vocab_size=4096)
    model = tiny_causal_lm(
        tok, arch=args.arch, hidden=args.hidden, layers=args.layers, attn_implementation=args.attn
    )
    ref = tiny_causal_lm(
        tok, arch=args.arch, hidden=args.hidden, layers=args.layers, seed=1, attn_implementation=args.attn
    )
    rng = random.Random(args.seed)
    trees = [make_tree(rng, len(tok), i, args) for i in range(args.m)]
    adv = [rng.gauss(0.0, 1.0) for _ in range(sum(len(t.leaves()) for t in trees))]
    cfg = LossConfig(loss_agg_mode=args.loss_agg_mode)  # reference defaults: KL k3 β=0.001, entropy 0.001

    batches = {p: pack(trees, adv, p, cfg.loss_agg_mode) for p in ("tree", "leaf")}
    with torch.no_grad():
        refs = {p: forward_logprobs(ref, b)[0] for p, b in batches.items()}

    def run(p: str) -> tuple[float, float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = packed_loss(model, batches[p], cfg, refs[p])
        loss.backward()
        dt = time.perf_counter() - t0
        return dt, loss.item(), [q.grad.detach().clone() for q in model.parameters()]

    run("tree"), run("leaf")  # warm-up
    times: dict[str, list[float]] = {"tree": [], "leaf": []}
    for _ in range(args.repeats):
        for p in ("tree", "leaf"):
            times[p].append(run(p)[0])
    _, loss_t, grad_t = run("tree")
    _, loss_l, grad_l = run("leaf")
    wall_t, wall_l = statistics.median(times["tree"]), statistics.median(times["leaf"])
    tok_t, tok_l = batches["tree"].num_forward_tokens, batches["leaf"].num_forward_tokens
    result = {
        "shape": [args.m, args.n, args.l],
        "leaves": len(adv),
        "forward_tokens_tree": tok_t,
        "forward_tokens_leaf": tok_l,
        "forward_token_ratio": round(tok_t / tok_l, 4),
        "wall_seconds_tree": round(wall_t, 4),
        "wall_seconds_leaf": round(wall_l, 4),
        "wall_ratio": round(wall_t / wall_l, 4),
        "max_abs_grad_diff": max((a - b).abs().max().item() for a, b in zip(grad_t, grad_l, strict=True)),
        "max_abs_grad": max(g.abs().max().item() for g in grad_l),
        "max_rel_grad_diff": max((a - b).abs().max().item() for a, b in zip(grad_t, grad_l, strict=True))
        / max(max(g.abs().max().item() for g in grad_l), 1e-30),
        "loss_abs_diff": abs(loss_t - loss_l),
        "arch": args.arch,
        "attn_implementation": args.attn,
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
