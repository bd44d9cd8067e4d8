"""`path` packing: exact tree training whose peak memory is about one root→leaf path (SPEC §10).

A tree row is split into segments (chains of nodes, `PackedBatch.segments`). The walk is depth-first:
a segment is forwarded against the cached keys/values of its ancestors (a fresh `DynamicCache` built from
their tensors per segment: one cache object per branch, never shared), its scored tokens' log-probs come
from its own hidden states, and its own keys/values are kept for its children. The parent's last token is
forwarded again at the start of each child (its hidden state predicts the child's first token), so a child
needs nothing from its parent but keys/values. Cost: one extra token per branch and one model call per
segment.

With gradients (`path_loss`), each segment's keys/values are handed to its children as detached leaves.
After the children are done, the segment runs its own backward with its local loss and the gradients that
its children left on those leaves; that pushes the gradient into the parameters and into its ancestors'
leaves, and frees its graph. Only the segments on the current path hold graphs, so peak activation memory
is one path's activations plus that path's KV, whatever the number of leaves. The loss is a sum over tokens,
so the per-segment losses add up to the full loss and the gradients are those of `leaf` packing.

The backward passes run inside `path_loss`, into a private gradient buffer (the parameters' existing
`.grad` are set aside and restored). It returns a surrogate tensor whose value is the real loss and whose
`.backward()` adds `scale × buffer` to each parameter's `.grad`, so a caller's `(loss * k).backward()` works
as with the other packings. Cost: one extra gradient-sized buffer per micro-batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from treegrpo.logits import split_causal_lm, token_scores
from treegrpo.loss import LossConfig, TokenWeights, policy_loss_value, weighted_policy_loss
from treegrpo.packing import PackedBatch, model_device_dtype

_KV = list[tuple[Tensor, Tensor]]  # per layer (keys, values), (1, kv_heads, S, head_dim)
SegmentLoss = Callable[[int, Tensor, Tensor, Tensor | None], Tensor | None]


def path_forward(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    only_loss_tokens: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies), (R, T) float32, segment by segment (no backward here)."""
    return _walk(model, batch, temperature, compute_entropy, only_loss_tokens, None)


def path_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    config: LossConfig,
    ref_logprobs: Tensor | None,
    temperature: float,
    on_policy: bool,
) -> tuple[Tensor, dict[str, float]]:
    """The loss with per-segment backward passes done; returns (surrogate, metrics) — see the module doc."""
    device, _ = model_device_dtype(model)
    w = batch.weights.to(torch.float32, device)
    old_all = batch.old_logprobs.to(device)
    ref_all = None if ref_logprobs is None else ref_logprobs.to(device)

    def segment_loss(row: int, cols: Tensor, lp: Tensor, ent: Tensor | None) -> Tensor | None:
        if cols.numel() == 0:
            return None
        tw = TokenWeights(*(getattr(w, f)[row, cols] for f in _TW))
        old = lp.detach() if on_policy else old_all[row, cols]
        ref = None if ref_all is None else ref_all[row, cols]
        return policy_loss_value(lp, old, tw, config, ref, ent)

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            lp, ent = _walk(model, batch, temperature, True, True, segment_loss)
        grads = [p.grad for p in params]
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    old = lp if on_policy else old_all
    value, metrics = weighted_policy_loss(lp, old, batch.weights, config, ref_all, ent)
    metrics["forward_tokens"] = float(batch.num_forward_tokens + sum(s.parent >= 0 for s in batch.segments))
    holder = _Grads(grads)
    return _InjectGrads.apply(value.detach(), holder, *params), metrics


_TW = ("adv_pos", "adv_neg", "weight", "weight_pos", "weight_neg")


class _Grads:
    def __init__(self, grads: list[Tensor | None]) -> None:
        self.grads = grads


class _InjectGrads(torch.autograd.Function):
    """Value: the loss. Backward: the precomputed parameter gradients times the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, holder: _Grads, *params: Tensor) -> Tensor:  # noqa: ARG004
        ctx.holder = holder
        return value.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.holder.grads
        ctx.holder = None
        return (None, None, *[None if x is None else x * g.to(x.dtype) for x in grads])


def _walk(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float,
    entropy: bool,
    only_loss_tokens: bool,
    segment_loss: SegmentLoss | None,
) -> tuple[Tensor, Tensor | None]:
    parts = split_causal_lm(model)
    if parts is None:
        raise ValueError(
            "packing 'path' needs a transformers causal LM (get_decoder / get_output_embeddings), "
            "not wrapped in DistributedDataParallel"
        )
    device, _ = model_device_dtype(model)
    d = batch.on(device)
    ids, pos, target = d["input_ids"], d["position_ids"], d["target_index"]
    want = (d["loss_mask"] if only_loss_tokens else d["valid"]) & (target >= 0)
    r, t = batch.input_ids.shape
    lp_out = torch.zeros((r, t), dtype=torch.float32, device=device)
    ent_out = torch.zeros((r, t), dtype=torch.float32, device=device) if entropy else None
    segs = batch.segments
    children: list[list[int]] = [[] for _ in segs]
    roots: list[int] = []
    for i, s in enumerate(segs):
        (children[s.parent] if s.parent >= 0 else roots).append(i)
    train = segment_loss is not None
    config = getattr(parts.decoder, "config", None)
    cache_kw = (
        "cache" if "cache" in inspect.signature(parts.decoder.forward).parameters else "past_key_values"
    )

    def visit(i: int, past: list[_KV]) -> None:
        seg = segs[i]
        row = seg.row
        slots = torch.arange(seg.start, seg.end, device=device)
        p_last = segs[seg.parent].end - 1 if seg.parent >= 0 else -1
        if p_last >= 0:  # the parent's last token again: its hidden state predicts our first token
            slots = torch.cat([slots.new_tensor([p_last]), slots])
        off = int(p_last >= 0)
        cache = _cache_from(past, config)
        past_len = cache.get_seq_length()
        out = parts.decoder(
            input_ids=ids[row, slots][None],
            position_ids=pos[row, slots][None],
            use_cache=True,
            **{cache_kw: cache},
        )
        hidden = out.last_hidden_state[0]
        local = want[row, seg.start : seg.end].nonzero().squeeze(1)
        cols = local + seg.start
        tgt = target[row, cols]
        h_idx = torch.where(tgt == p_last, 0, tgt - seg.start + off) if off else tgt - seg.start
        lp, ent = token_scores(hidden[h_idx], ids[row, cols], parts, temperature, batch.logits_chunk, entropy)
        lp_out[row, cols] = lp.detach()
        if ent_out is not None and ent is not None:
            ent_out[row, cols] = ent.detach()
        own = [
            (layer.keys[:, :, past_len + off :], layer.values[:, :, past_len + off :])
            for layer in cache.layers
        ]
        del cache, out
        loss = segment_loss(row, cols, lp, ent) if train else None
        if not train:
            del hidden
        if not children[i]:
            if loss is not None:
                loss.backward()
            return
        kept = [
            (k.detach().clone().requires_grad_(train), v.detach().clone().requires_grad_(train))
            for k, v in own
        ]
        if not train:
            own = []  # the full concatenated cache tensors can go
        for c in children[i]:
            visit(c, [*past, kept])
        if not train:
            return
        outs: list[Tensor] = [] if loss is None else [loss]
        grads: list[Tensor] = [] if loss is None else [torch.ones_like(loss)]
        for (k, v), (lk, lv) in zip(own, kept, strict=True):
            for x, leaf in ((k, lk), (v, lv)):
                if leaf.grad is not None and x.requires_grad:
                    outs.append(x)
                    grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)

    for root in roots:
        visit(root, [])
    return lp_out, ent_out


def _cache_from(past: list[_KV], config: Any) -> DynamicCache:
    """A new cache holding the ancestors' keys/values; the last ancestor's last slot is left out (re-run)."""
    if not past:
        return DynamicCache(config=config) if config is not None else DynamicCache()
    layers = []
    for li in range(len(past[0])):
        ks = [a[li][0] for a in past]
        vs = [a[li][1] for a in past]
        ks[-1], vs[-1] = ks[-1][:, :, :-1], vs[-1][:, :, :-1]
        layers.append((torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
    return DynamicCache(ddp_cache_data=layers, config=config)
