"""GPU memory / throughput sweep of the packing modes on a random-init Qwen2.5-1.5B-shaped model (bf16).

    python scripts/gpu_check.py --sweep            # ~5 min on one H100/H200-class GPU, no download

The model is built from a config (Qwen2.5-1.5B's shape: hidden 1536, 28 layers, 12 heads / 2 KV heads,
intermediate 8960, vocabulary 151,936, tied embeddings) with random weights in bf16. For each tree shape
(a prompt, `leaves` root→leaf paths of 3 steps of `gen` generated + `obs` observation tokens, two trees) and
each mode — `leaf`, `tree_dense` (sdpa, additive mask), `tree_flex` (FlexAttention BlockMask), `path` —
one forward + backward of the loss: `torch.cuda.max_memory_allocated` above the model's own memory, the
median wall time of `repeats`, tokens per second, and the loss / gradient difference against `leaf`
(bf16, so relative, and only as a sanity check; exactness is tested in fp32 on CPU). A mode that runs out of
memory is recorded as {"oom": true}.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from treegrpo.loss import LossConfig
from treegrpo.packing import forward_logprobs, pack, packed_loss
from treegrpo.tree import Tree

QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
)
# (prompt, leaves, gen, obs): the quickstart-like shape, then the recipe's (4k prompt, 6 leaves, 500-token obs)
SHAPES = [(512, 6, 128, 64), (2048, 6, 256, 256), (4096, 6, 256, 500)]
MODES = ("leaf", "tree_dense", "tree_flex", "path")


def _tree(rng: random.Random, vocab: int, index: int, prompt: int, leaves: int, gen: int, obs: int) -> Tree:
    t = Tree.new("sweep", index, [rng.randrange(vocab) for _ in range(prompt)])

    def chain(node: int) -> None:
        while t.nodes[node].depth < 3:
            last = t.nodes[node].depth == 2
            node = t.add_child(
                node,
                token_ids=[rng.randrange(vocab) for _ in range(gen)],
                logprobs=[-rng.random() for _ in range(gen)],
                obs_ids=[] if last else [rng.randrange(vocab) for _ in range(obs)],
                is_leaf=last,
            ).id

    chain(0)
    while len(t.leaves()) < leaves:
        chain(rng.choice([n.id for n in t.internal_nodes()]))
    return t


def _set_attn(model: torch.nn.Module, impl: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def sweep(repeats: int = 3, shapes: list[tuple[int, int, int, int]] | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    device = torch.device("cuda")
    config = Qwen2Config(**QWEN25_15B)
    torch.manual_seed(0)
    with device:  # initialise on the GPU directly
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.gradient_checkpointing_disable()
    base_mb = torch.cuda.memory_allocated(device) / 2**20
    cfg = LossConfig(beta=0.0)  # one model on the GPU; the KL term needs a second forward only
    out: dict[str, Any] = {
        "model": "qwen2.5-1.5b-shaped (random init, bf16)",
        "model_mb": round(base_mb),
        "shapes": [],
    }
    for prompt, leaves, gen, obs in shapes or SHAPES:
        rng = random.Random(prompt + leaves)
        trees = [_tree(rng, config.vocab_size, i, prompt, leaves, gen, obs) for i in range(2)]
        adv = [rng.gauss(0.0, 1.0) for _ in range(sum(len(t.leaves()) for t in trees))]
        batches = {
            "leaf": pack(trees, adv, "leaf", logits_chunk=1024),
            "tree_dense": pack(trees, adv, "tree", max_tokens_per_row=0, logits_chunk=1024),
            "tree_flex": pack(trees, adv, "tree", max_tokens_per_row=0, logits_chunk=1024),
            "path": pack(trees, adv, "path", logits_chunk=1024),
        }
        row: dict[str, Any] = {
            "prompt": prompt,
            "leaves": len(adv),
            "gen": gen,
            "obs": obs,
            "unique_tokens": batches["tree_dense"].num_forward_tokens,
            "leaf_tokens": batches["leaf"].num_forward_tokens,
            "modes": {},
        }
        ref_loss, ref_grad = None, None
        for mode in MODES:
            _set_attn(model, "flex_attention" if mode == "tree_flex" else "sdpa")
            batch = batches[mode]

            def step() -> tuple[float, list[torch.Tensor | None]]:
                model.zero_grad(set_to_none=True)
                loss, _ = packed_loss(model, batch, cfg, on_policy=True)  # noqa: B023
                loss.backward()
                return loss.item(), [p.grad for p in model.parameters()]

            try:
                step()  # warm-up (flex compiles its kernels here)
                times = []
                for _ in range(repeats):
                    torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                loss, grads = step()
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            except torch.cuda.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                row["modes"][mode] = {"oom": True}
                continue
            wall = statistics.median(times)
            res: dict[str, Any] = {
                "peak_mb": round(peak, 1),
                "wall_seconds": round(wall, 4),
                "unique_tokens_per_second": round(row["unique_tokens"] / wall),
                "loss": loss,
            }
            if mode == "leaf":
                ref_loss = loss
                ref_grad = [None if g is None else g.detach().float().flatten()[::97].clone() for g in grads]
            elif ref_grad is not None:
                num = den = 0.0
                for g, r in zip(grads, ref_grad, strict=True):
                    if g is None or r is None:
                        continue
                    gs = g.detach().float().flatten()[::97]
                    num += float((gs - r).square().sum())
                    den += float(r.square().sum())
                res["grad_rel_diff"] = (num / max(den, 1e-30)) ** 0.5  # on every 97th gradient entry
                res["loss_abs_diff"] = abs(loss - ref_loss)
            row["modes"][mode] = res
            model.zero_grad(set_to_none=True)
        try:
            with torch.no_grad():  # old-log-prob forward agreement of flex vs dense (forward only)
                _set_attn(model, "sdpa")
                lp_d = forward_logprobs(model, batches["tree_dense"], compute_entropy=False)[0]
                _set_attn(model, "flex_attention")
                lp_f = forward_logprobs(model, batches["tree_flex"], compute_entropy=False)[0]
            row["flex_vs_dense_logprob_max_abs_diff"] = float((lp_d - lp_f).abs().max())
        except torch.cuda.OutOfMemoryError:
            row["flex_vs_dense_logprob_max_abs_diff"] = None
        _set_attn(model, "sdpa")
        out["shapes"].append(row)
        torch.cuda.empty_cache()
    return out
