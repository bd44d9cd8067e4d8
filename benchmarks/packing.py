"""Packing modes side by side: forwarded tokens, training wall time, peak memory and exactness against `leaf`.

    python benchmarks/packing.py --json            # both shapes, all modes
    python benchmarks/packing.py --json --quick    # smaller, a smoke run (same keys)

Shapes:
- `synthetic`: Tree-GRPO default (2, 2, 1) trees (2 trees per prompt, each a full chain plus 2 expansions
  from random nodes) with a 200-token prompt and 3 steps of ~100 generated + 50 observation tokens, on a
  tiny random Llama (hidden 128, 4 layers, vocabulary 4096), loss with the reference defaults (KL β=0.001
  against a second model, entropy 0.001).
- `quickstart`: a replay of the trees the warm-started quickstart model sampled at its first RL step
  (`benchmarks/data/quickstart_trees.jsonl`: 32 prompts × 2 trees, ids and sampling log-probs), on a
  random model of the quickstart's shape (Llama, hidden 96, 3 layers, its vocabulary); loss as the preset
  trains it (β = 0, on-policy: one forward + backward).

Modes: `leaf` (one row per root→leaf path), `tree` (one row per tree), `tree_rows` (whole trees binned
into rows of `--row-tokens`, default the largest tree) and `path` (depth-first, per-branch backward);
FlexAttention is measured by `scripts/gpu_check.py --sweep`. The time of one forward + backward of the whole batch, median of
`--repeats`, modes interleaved. Each shape's top-level figures are those of `tree_rows` (the recommended
mode) over `leaf`; every mode's figures are under `modes`. Peak memory: see `peak_memory.py` (on CPU the
script measures it in a second run of itself with the allocator setting; times come from this process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak_memory  # noqa: E402
from treegrpo.logits import CausalLMParts, split_causal_lm, token_scores  # noqa: E402
from treegrpo.loss import LossConfig  # noqa: E402
from treegrpo.models import tiny_causal_lm  # noqa: E402
from treegrpo.packing import PackedBatch, forward_logprobs, pack, packed_loss  # noqa: E402
from treegrpo.tokenizer import train_tokenizer  # noqa: E402
from treegrpo.tree import Tree  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "quickstart_trees.jsonl"
HEADLINE = "tree_rows"


def make_tree(rng: random.Random, vocab: int, index: int, a: argparse.Namespace) -> Tree:
    """One chain of `steps` steps, then `n` expansions per iteration from random non-leaf nodes."""
    t = Tree.new("bench", index, [rng.randrange(vocab) for _ in range(a.prompt)])

    def step(parent: int, depth: int) -> int:
        gen = max(1, int(rng.gauss(a.gen, a.gen * 0.2)))
        last = depth == a.steps
        node = t.add_child(
            parent,
            token_ids=[rng.randrange(vocab) for _ in range(gen)],
            logprobs=[-rng.random() * 2 for _ in range(gen)],
            obs_ids=[] if last else [rng.randrange(vocab) for _ in range(a.obs)],
            is_leaf=last,
        )
        return node.id

    def run_from(node_id: int) -> None:
        cur = node_id
        while not t.nodes[cur].is_leaf:
            cur = step(cur, t.nodes[cur].depth + 1)

    run_from(0)
    for _ in range(a.l):
        for p in [rng.choice([n.id for n in t.internal_nodes()]) for _ in range(a.n)]:
            run_from(p)
    return t


def load_trees(path: Path, limit: int) -> tuple[list[Tree], int]:
    """Saved trees (first line: {"vocab_size": V}) and the vocabulary size they were sampled with."""
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    trees = [Tree.from_dict(json.loads(x)) for x in lines[1:] if x.strip()]
    return trees[:limit] if limit else trees, int(head["vocab_size"])


def compare(
    model: torch.nn.Module,
    batches: dict[str, PackedBatch],
    cfg: LossConfig,
    refs: dict[str, torch.Tensor | None],
    on_policy: bool,
    repeats: int,
    device: torch.device,
    peaks_from: dict[str, float] | None,
) -> dict[str, Any]:
    def step(mode: str) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, _ = packed_loss(model, batches[mode], cfg, refs[mode], on_policy=on_policy)
        loss.backward()
        return loss.item(), [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
        ]

    def timed(mode: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    modes = list(batches)
    for m in modes:
        step(m)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            times[m].append(timed(m))
    peaks, results = {}, {}
    for m in modes:
        if peaks_from is None:  # this process measures memory (GPU, or CPU with the allocator setting)
            peaks[m], results[m] = peak_memory.peak_mb(lambda m=m: step(m), device)
        else:
            peaks[m], results[m] = peaks_from[m], step(m)
    loss_l, grad_l = results["leaf"]
    scale = max(g.abs().max().item() for g in grad_l)
    wall_l = statistics.median(times["leaf"]) if repeats else 1.0  # repeats = 0: peaks only
    out: dict[str, Any] = {}
    for m in modes:
        loss_m, grad_m = results[m]
        diff = max((a - b).abs().max().item() for a, b in zip(grad_m, grad_l, strict=True))
        b = batches[m]
        wall = statistics.median(times[m]) if repeats else 0.0
        out[m] = {
            "rows": int(b.input_ids.shape[0]),
            "row_length": int(b.input_ids.shape[1]),
            "forward_tokens": b.num_forward_tokens,
            "padding_fraction": round(1 - b.num_forward_tokens / b.input_ids.numel(), 4),
            "wall_seconds": round(wall, 4),
            "peak_mb": round(peaks[m], 1),
            "forward_token_ratio": round(b.num_forward_tokens / batches["leaf"].num_forward_tokens, 4),
            "wall_ratio": round(wall / wall_l, 4),
            "peak_memory_ratio": round(peaks[m] / max(peaks["leaf"], 1e-9), 4),
            "max_abs_grad_diff": diff,
            "max_rel_grad_diff": diff / max(scale, 1e-30),
            "loss_abs_diff": abs(loss_m - loss_l),
        }
    return out


def run_shape(
    name: str,
    trees: list[Tree],
    model: torch.nn.Module,
    ref: torch.nn.Module | None,
    cfg: LossConfig,
    on_policy: bool,
    a: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    rng = random.Random(a.seed)
    adv = [rng.gauss(0.0, 1.0) for _ in range(sum(len(t.leaves()) for t in trees))]
    sizes = [len(pack([t], [0.0] * len(t.leaves()), "tree").input_ids[0]) for t in trees]
    budget = a.row_tokens or max(sizes)
    kw: dict[str, Any] = dict(loss_agg_mode=cfg.loss_agg_mode, logits_chunk=a.logits_chunk)
    batches = {
        "leaf": pack(trees, adv, "leaf", **kw),
        "tree": pack(trees, adv, "tree", max_tokens_per_row=0, **kw),
        "tree_rows": pack(trees, adv, "tree", max_tokens_per_row=budget, **kw),
        "path": pack(trees, adv, "path", **kw),
    }
    refs: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        for m, b in batches.items():
            refs[m] = forward_logprobs(ref, b, compute_entropy=False)[0] if ref is not None else None
    modes = compare(model, batches, cfg, refs, on_policy, a.repeats, device, a.peaks.get(name))
    head = modes[HEADLINE]
    return {
        "trees": len(trees),
        "leaves": len(adv),
        "tree_tokens_max": max(sizes),
        "row_tokens": budget,
        "headline_mode": HEADLINE,
        **{k: head[k] for k in ("forward_token_ratio", "wall_ratio", "peak_memory_ratio")},
        "max_abs_grad_diff": max(v["max_abs_grad_diff"] for v in modes.values()),
        "loss_abs_diff": max(v["loss_abs_diff"] for v in modes.values()),
        "modes": modes,
    }


def logits_memory(model: torch.nn.Module, chunk: int, device: torch.device) -> dict[str, Any]:
    """Peak memory of log-probs + entropies (forward + backward) for 4 chunks of rows, against chunk × V × 4 B.

    Two cases: the synthetic model's own head (small vocabulary, trained head) and a 32,768-token head that
    is frozen, as under LoRA (the case where a big vocabulary makes logits the largest item). Each reports
    the gradient buffers any method must produce (the hidden states' gradient, and the head weight's when
    it trains) and the peak net of them, which is the logits' own memory."""
    parts = split_causal_lm(model)
    assert parts is not None
    out = _logits_case(parts, chunk, device)
    big = torch.nn.Linear(parts.head.in_features, 32_768, bias=False, device=device).requires_grad_(False)
    out["frozen_head_v32768"] = _logits_case(CausalLMParts(parts.decoder, big, None), chunk, device)
    return out


def _logits_case(parts: CausalLMParts, chunk: int, device: torch.device) -> dict[str, Any]:
    n, hid, vocab = 4 * chunk, parts.head.in_features, parts.head.out_features
    h = torch.randn(n, hid, device=device, requires_grad=True)
    y = torch.randint(0, vocab, (n,), device=device)
    head_trains = any(p.requires_grad for p in parts.head.parameters())

    def run() -> None:
        h.grad = None
        for p in parts.head.parameters():
            p.grad = None
        lp, ent = token_scores(h, y, parts, 1.0, chunk, True)
        (lp.sum() + ent.sum()).backward()

    run()
    peak, _ = peak_memory.peak_mb(run, device)
    unit = chunk * vocab * 4 / 2**20
    grads = (n * hid + (vocab * hid if head_trains else 0)) * 4 / 2**20
    return {
        "rows": n,
        "chunk": chunk,
        "vocab": vocab,
        "head_trains": head_trains,
        "peak_mb": round(peak, 1),
        "chunk_x_vocab_x4_mb": round(unit, 1),
        "peak_over_chunk_x_vocab_x4": round(peak / unit, 3),
        "input_grads_mb": round(grads, 1),
        "logits_only_over_chunk_x_vocab_x4": round((peak - grads) / unit, 3),
        "all_rows_x_vocab_x4_mb": round(4 * unit, 1),
    }


def cpu_peaks_in_subprocess() -> dict[str, dict[str, float]]:
    """Peak memory per shape and mode, measured by this script in a process with the allocator setting."""
    env = {**os.environ, **peak_memory.ALLOCATOR_ENV}
    cmd = [sys.executable, *sys.argv, "--peaks-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"memory subprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (a smoke run, same keys)")
    ap.add_argument(
        "--shapes", nargs="+", choices=["synthetic", "quickstart"], default=["synthetic", "quickstart"]
    )
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--l", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--gen", type=int, default=100)
    ap.add_argument("--obs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    ap.add_argument("--row-tokens", type=int, default=0, help="tree_rows budget (0 = the largest tree)")
    ap.add_argument("--logits-chunk", type=int, default=1024)
    ap.add_argument("--quickstart-trees", type=int, default=0, help="use the first K saved trees (0 = all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)  # the memory subprocess
    a = ap.parse_args()
    a.peaks, logits_mem = {}, None
    if not torch.cuda.is_available() and not a.peaks_only and not a.quick:  # --quick: in-process (rougher)
        sub = cpu_peaks_in_subprocess()
        a.peaks, logits_mem = sub["shapes"], sub.get("logits_memory")
    if a.peaks_only:
        a.repeats = 0
    if a.quick:
        a.prompt, a.gen, a.obs, a.repeats = 50, 20, 10, 1
        a.quickstart_trees = a.quickstart_trees or 8
    if a.threads:
        torch.set_num_threads(a.threads)
    peak_memory._libc()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"shapes": {}}
    if "synthetic" in a.shapes:
        tok = train_tokenizer([" ".join(f"w{i}" for i in range(2000))], vocab_size=4096)
        hidden, layers = (64, 2) if a.quick else (128, 4)
        model = tiny_causal_lm(tok, hidden=hidden, layers=layers, attn_implementation=a.attn).to(device)
        ref = tiny_causal_lm(tok, hidden=hidden, layers=layers, seed=1, attn_implementation=a.attn).to(device)
        rng = random.Random(a.seed)
        trees = [make_tree(rng, len(tok), i, a) for i in range(a.m)]
        cfg = LossConfig()  # reference defaults: KL k3 β=0.001, entropy 0.001
        out["shapes"]["synthetic"] = run_shape("synthetic", trees, model, ref, cfg, False, a, device)
        out["logits_memory"] = logits_mem or logits_memory(model, a.logits_chunk, device)
    if "quickstart" in a.shapes:
        trees, vocab = load_trees(DATA, a.quickstart_trees)

        class _Tok:  # tiny_causal_lm reads only the size and special ids
            pad_token_id, bos_token_id, eos_token_id = 0, None, None

            def __len__(self) -> int:
                return vocab

        model = tiny_causal_lm(_Tok(), hidden=96, layers=3, heads=4, attn_implementation=a.attn).to(device)  # type: ignore[arg-type]
        cfg = LossConfig(beta=0.0)  # the preset: no KL term
        out["shapes"]["quickstart"] = run_shape("quickstart", trees, model, None, cfg, True, a, device)
    out["device"] = str(device)
    out["threads"] = torch.get_num_threads()
    out["memory_method"] = peak_memory.method(device) + (
        "; --quick: in this process with glibc's default allocator (rougher)"
        if a.quick and device.type == "cpu"
        else ""
    )
    out["attn_implementation"] = a.attn
    if a.peaks_only:
        peaks = {s: {m: v["peak_mb"] for m, v in r["modes"].items()} for s, r in out["shapes"].items()}
        print(json.dumps({"shapes": peaks, "logits_memory": out.get("logits_memory")}))
        return
    if a.json:
        print(json.dumps(out))
    else:
        for shape, r in out["shapes"].items():
            print(f"[{shape}] trees {r['trees']} leaves {r['leaves']}")
            for m, v in r["modes"].items():
                print(
                    f"  {m:>10}: tokens {v['forward_token_ratio']:.3f}  wall {v['wall_ratio']:.3f}  "
                    f"peak {v['peak_memory_ratio']:.3f} ({v['peak_mb']} MB)  grad diff {v['max_abs_grad_diff']:.2e}"
                )


if __name__ == "__main__":
    main()
