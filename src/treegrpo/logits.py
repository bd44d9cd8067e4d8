"""Log-probs and entropies computed only where the loss needs them, a chunk of rows at a time.

A causal LM's vocabulary projection and fp32 log-softmax are the largest memory item of training with a
big vocabulary (152k for Qwen): (rows × slots × vocab) floats. Here the decoder runs once for hidden
states, the hidden state of each scored token's *parent slot* is gathered into an (N, H) matrix, and the
LM head + log-softmax run over `chunk` rows at a time. With gradients on, each chunk saves only its
(chunk, H) input; the backward recomputes its logits and forms the gradient analytically in place
(`_ChunkScores`), so peak logits memory is a few (chunk × vocab) floats in forward and backward alike,
whatever N is.

`split_causal_lm` finds the decoder and LM head of a transformers causal LM, also inside a peft wrapper
(LoRA layers live inside those modules, so calling them applies the adapter) and with tied embeddings
(the head is whatever `get_output_embeddings` returns). Models whose logits need more than the head
(Gemma's soft-capping, Cohere's logit scale) get that applied; anything not recognised returns None and
the caller falls back to the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_LOGITS_CHUNK = 1024


@dataclass(frozen=True)
class CausalLMParts:
    """The pieces of a causal LM: hidden states from `decoder`, logits = post(head(hidden))."""

    decoder: nn.Module
    head: nn.Module
    post: Callable[[Tensor], Tensor] | None  # soft-capping / scaling after the head, if the model has it


def split_causal_lm(model: nn.Module) -> CausalLMParts | None:
    """Decoder and LM head of `model` (a transformers causal LM, maybe peft-wrapped), or None if unsure."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None  # calling submodules would bypass DDP's gradient hooks
    m = model
    get_base = getattr(m, "get_base_model", None)  # peft.PeftModel
    if callable(get_base):
        m = get_base()
    try:
        decoder = m.get_decoder()
        head = m.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module) or decoder is m:
        return None
    cfg = getattr(m, "config", None)
    post = None
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if softcap:
        cap = float(softcap)
        post = lambda x: torch.tanh(x / cap) * cap  # noqa: E731
    elif isinstance(scale, int | float) and scale != 1:
        s = float(scale)
        post = lambda x: x * s  # noqa: E731
    return CausalLMParts(decoder=decoder, head=head, post=post)


def _chunk_scores(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    post: Callable[[Tensor], Tensor] | None,
    temperature: float,
    entropy: bool,
) -> tuple[Tensor, Tensor]:
    """Forward only (no graph): log-prob of each target and the entropy, float32."""
    logits = head(hidden)
    if post is not None:
        logits = post(logits)
    with _fp32(logits):  # under bf16 autocast the bmm below would round the entropy to bf16
        x = logits.float()
        del logits
        if temperature != 1.0:
            x = x / temperature
        logp = torch.log_softmax(x, dim=-1)
        del x
        lp = logp.gather(-1, targets[:, None]).squeeze(-1)
        if not entropy:
            return lp, torch.zeros_like(lp)
        # H = -Σ p·log p as a batched dot product: no third (chunk, V) tensor for the product
        ent = -torch.bmm(logp.exp()[:, None, :], logp[:, :, None]).reshape(-1)
        return lp, ent


def _fp32(x: Tensor) -> Any:
    """No autocast: the log-softmax, entropy and their gradients stay float32 whatever the compute dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class _ChunkScores(torch.autograd.Function):
    """One chunk's log-probs and entropies; saves only the (chunk, H) input, recomputes logits in backward.

    Backward, with z = logits / T, p = softmax(z), H the entropy:
    ∂lp/∂z = onehot(y) − p and ∂H/∂z = −p·(log p + H), combined in place in one (chunk, V) buffer, then
    pushed through the head (and soft-capping) by autograd on the recomputed logits. Peak: the logits, one
    float32 buffer and p, about three (chunk, V) tensors in forward and backward alike.
    """

    @staticmethod
    def forward(  # noqa: ANN205
        ctx: Any, hidden: Tensor, targets: Tensor, parts: CausalLMParts, temperature: float, entropy: bool
    ):
        ctx.save_for_backward(hidden, targets)
        ctx.parts, ctx.temperature, ctx.entropy = parts, temperature, entropy
        with torch.no_grad():
            return _chunk_scores(hidden, targets, parts.head, parts.post, temperature, entropy)

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor, g_ent: Tensor):  # noqa: ANN205
        hidden, targets = ctx.saved_tensors
        parts, temp = ctx.parts, ctx.temperature
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            logits = parts.head(h)
            if parts.post is not None:
                logits = parts.post(logits)
        with torch.no_grad(), _fp32(logits):
            buf = torch.log_softmax(logits.detach().float() / temp, dim=-1)  # log p
            p = buf.exp()
            g_lp = g_lp.float()
            if ctx.entropy:
                ent = -torch.bmm(p[:, None, :], buf[:, :, None]).reshape(-1)
                # −p·(g_lp + g_ent·(log p + H)) + g_lp·onehot
                buf.add_(ent[:, None]).mul_(g_ent.float()[:, None]).add_(g_lp[:, None])
            else:
                buf.copy_(g_lp[:, None].expand_as(buf))
            buf.mul_(p).neg_()
            del p
            rows = torch.arange(buf.shape[0], device=buf.device)
            buf[rows, targets] += g_lp
            if temp != 1.0:
                buf.div_(temp)
            grad_logits = buf.to(logits.dtype)
            del buf
        torch.autograd.backward(logits, grad_logits)  # head parameters' .grad and h.grad
        return h.grad if hidden.requires_grad else None, None, None, None, None


def token_scores(
    hidden: Tensor,
    targets: Tensor,
    parts: CausalLMParts,
    temperature: float = 1.0,
    chunk: int = DEFAULT_LOGITS_CHUNK,
    entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of `targets` (N,) and entropy under softmax(head(hidden) / T), hidden (N, H); float32.

    `chunk` ≤ 0 means one chunk. With grad enabled every chunk is checkpointed (recomputed in backward).
    """
    n = hidden.shape[0]
    step = n if chunk <= 0 else chunk
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in parts.head.parameters())
    )
    lps: list[Tensor] = []
    ents: list[Tensor] = []
    for s in range(0, max(n, 1), max(step, 1)):
        h, y = hidden[s : s + step], targets[s : s + step]
        if grad:
            lp, ent = _ChunkScores.apply(h, y, parts, temperature, entropy)
        else:
            lp, ent = _chunk_scores(h, y, parts.head, parts.post, temperature, entropy)
        lps.append(lp)
        ents.append(ent)
    lp_all = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
    ent_all = (torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32)) if entropy else None
    return lp_all, ent_all
