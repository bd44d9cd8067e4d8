"""One-shot check of the vLLM backend on a GPU machine: load a model, one tree rollout, one weight sync.

    pip install -e ".[vllm]"            # on a CUDA machine
    python scripts/gpu_check.py          # tiny random Llama built here (no download)
    python scripts/gpu_check.py --model /models/Qwen2.5-0.5B-Instruct --m 2 --n 2
    python scripts/gpu_check.py --sweep      # packing memory/throughput sweep only (no vLLM needed), ~5 min

Prints one JSON object: versions, engine start-up seconds, the rollout's figures (trajectories, generated
tokens, tokens/s, tokens the engine served from its prefix cache), the weight sync (route, seconds) and
whether the engine follows the trainer after it (log-prob agreement with the HF model, greedy ids equal).
Exit code 1 if a check fails. `--sweep` instead runs `scripts/packing_sweep.py`: leaf vs dense tree mask vs
FlexAttention BlockMask vs `path` on a random-init Qwen2.5-1.5B-shaped bf16 model (peak memory, wall time,
loss / gradient agreement); exit code 1 if a mode that fits disagrees with `leaf` or flex's forward log-probs
disagree with the dense mask's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from treegrpo.policies.vllm import VLLMPolicy
from treegrpo.protocols import StepResult
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.tree import ActionKind

TEXT = (
    "who founded the company that employs the mother of the mayor ? search answer the fox jumps over a "
    "lazy dog . where when what city country person born located in capital of"
)


class ScriptEnv:
    """Two searches with a fixed observation, then the answer: a Search-R1-shaped episode, no retriever."""

    def start(self, row):
        return (row["q"], 0), [{"role": "user", "content": row["q"]}]

    def step(self, states, actions):
        out = []
        for (q, n), _ in zip(states, actions, strict=True):
            last = n + 1 >= 3
            obs = "" if last else "\n<information> the fox jumps over a lazy dog . </information>\n"
            out.append(
                StepResult(
                    (q, n + 1), obs, last, ActionKind.ANSWER if last else ActionKind.SEARCH, int(not last)
                )
            )
        return out

    def reward(self, state):
        return float(state[1] == 3)


def hf_logprobs(model, ctx: list[int], ids: list[int]) -> list[float]:
    x = torch.tensor([ctx + ids], device=model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(ids) - 1, device=model.device)
    return logp[pos, torch.tensor(ids, device=model.device)].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="HF model directory (default: a tiny random Llama)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--sweep", action="store_true", help="run the packing memory/throughput sweep only")
    ap.add_argument("--sweep-repeats", type=int, default=3)
    args = ap.parse_args()
    if args.sweep:
        return run_sweep(args.sweep_repeats)
    import transformers
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: dict = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    out["gpu"] = torch.cuda.get_device_name(0)
    tmp = Path(tempfile.mkdtemp(prefix="treegrpo-gpu-check-"))
    if args.model:
        path = Path(args.model)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    else:
        from treegrpo.models import tiny_causal_lm
        from treegrpo.tokenizer import train_tokenizer

        tok = train_tokenizer([TEXT])
        model = tiny_causal_lm(tok, hidden=256, layers=2, heads=4, seed=0).cuda()
        path = tmp / "tiny"
        model.save_pretrained(path)
        tok.save_pretrained(path)
    out["model"] = str(args.model or "tiny-llama-256x2")
    out["params"] = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    pol = VLLMPolicy.for_model(
        model,
        path,
        tok,
        max_new_tokens=args.max_new_tokens,
        seed=0,
        dtype="bfloat16",
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    out["engine_start_seconds"] = round(time.perf_counter() - t0, 2)
    out["sync_route"] = pol.engine.route

    rows = [{"q": f"{i} {TEXT}"} for i in range(args.prompts)]
    cfg = RolloutConfig(strategy="random", m=args.m, n=args.n, l=1)
    t0 = time.perf_counter()
    res = sample_forests(
        rows, [str(i) for i in range(len(rows))], pol, ScriptEnv(), cfg, np.random.default_rng(0)
    )
    dt = time.perf_counter() - t0
    b = res.budget
    ok_shapes = all(
        len(n.token_ids) == len(n.logprobs) for f in res.forests for t in f.trees for n in t.nodes[1:]
    )
    out["rollout"] = {
        "config": f"({args.m},{args.n},1)",
        "prompts": len(rows),
        "trajectories": b["trajectories"],
        "policy_calls": b["policy_calls"],
        "generated_tokens": b["generated_tokens"],
        "seconds": round(dt, 3),
        "generated_tokens_per_second": round(b["generated_tokens"] / dt, 1),
        "context_tokens_sent": b["prefill_tokens_no_reuse"],
        "engine_cached_tokens": pol.stats["cached_tokens"],
        "engine_prefilled_tokens": pol.stats["prefill_tokens"],
        "ids_and_logprobs_aligned": ok_shapes,
    }

    greedy = VLLMPolicy.for_model(model, path, tok, max_new_tokens=8, greedy=True)
    ctx = greedy.encode_prompt([{"role": "user", "content": TEXT}])
    before = greedy.generate([ctx])[0]
    out["logprob_max_abs_diff_before_sync"] = float(
        np.max(np.abs(np.array(before.logprobs) - hf_logprobs(model, ctx, before.token_ids)))
    )
    with torch.no_grad():  # stands in for an optimizer step that changes the policy a lot
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.get_input_embeddings().weight.mul_(8.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    syncs = greedy.engine.syncs
    after = greedy.generate([ctx])[0]  # the live model changed: pushed before generating
    out["sync_plus_generate_seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    greedy.sync_weights(model)
    torch.cuda.synchronize()
    out["sync_seconds"] = round(time.perf_counter() - t0, 3)
    out["synced_automatically"] = greedy.engine.syncs == syncs + 2
    out["logprob_max_abs_diff_after_sync"] = float(
        np.max(np.abs(np.array(after.logprobs) - hf_logprobs(model, ctx, after.token_ids)))
    )
    with torch.no_grad():
        hf_ids = model.generate(
            torch.tensor([ctx], device=model.device), max_new_tokens=len(after.token_ids), do_sample=False
        )[0, len(ctx) :].tolist()
    out["greedy_ids_equal_hf_after_sync"] = hf_ids == after.token_ids
    out["ok"] = bool(
        ok_shapes
        and out["synced_automatically"]
        and out["logprob_max_abs_diff_after_sync"] < 0.15
        and b["trajectories"] == len(rows) * args.m * (1 + args.n)
    )
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


def run_sweep(repeats: int) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from packing_sweep import sweep

    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), **sweep(repeats)}
    ok = True
    for row in out["shapes"]:
        diff = row["flex_vs_dense_logprob_max_abs_diff"]
        ok &= diff is None or diff < 0.1  # bf16 log-probs (None: out of memory)
        for res in row["modes"].values():
            if "grad_rel_diff" in res:  # both this mode and leaf fitted
                ok &= res["grad_rel_diff"] < 0.05 and res["loss_abs_diff"] < 1e-2
    out["ok"] = bool(ok)
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
