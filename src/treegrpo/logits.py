"""Log-probs and entropies computed only where the loss needs them, a chunk of rows at a time.

A causal LM's vocabulary projection and fp32 log-softmax are the largest memory item of training with a
big vocabulary (152k for Qwen): (rows × slots × vocab) floats. Here the decoder runs once for hidden
states, the hidden state of each scored token's *parent slot* is gathered into an (N, H) matrix, and the
LM head + log-softmax run over `chunk` rows at a time. With gradients on, each chunk saves only its
(chunk, H) input; the backward recomputes its logits and forms the gradient analytically in place
(`_ChunkScores`), so peak logits memory is about one (chunk × vocab) tensor in forward and backward alike,
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


_BLOCK_ROWS = 16  # rows per float32 temporary: the softmax math runs on (16, V) blocks, not (chunk, V)


def _block_scores(
    logits: Tensor, targets: Tensor, temperature: float, entropy: bool
) -> tuple[Tensor, Tensor]:
    """Float32 log-prob of each target and the entropy of one block of logits (rows, V)."""
    logp = _block_logp(logits, temperature)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return lp, torch.zeros_like(lp)
    return lp, _entropy(logp.exp(), logp)


def _block_logp(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) of one block, float32 (a new tensor: `logits` is left as it is)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _entropy(p: Tensor, logp: Tensor) -> Tensor:
    """H = -Σ p·log p per row as a batched dot product: no third (rows, V) tensor for the product."""
    return -torch.bmm(p[:, None, :], logp[:, :, None]).reshape(-1)


def _chunk_scores(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    post: Callable[[Tensor], Tensor] | None,
    temperature: float,
    entropy: bool,
) -> tuple[Tensor, Tensor]:
    """Forward only (no graph): log-prob of each target and the entropy, float32. Peak: the chunk's
    logits in the head's dtype plus (16, V) float32 temporaries."""
    logits = head(hidden)
    if post is not None:
        logits = post(logits)
    with _fp32(logits):  # under bf16 autocast the bmm would round the entropy to bf16
        out = [
            _block_scores(logits[r : r + _BLOCK_ROWS], targets[r : r + _BLOCK_ROWS], temperature, entropy)
            for r in range(0, logits.shape[0], _BLOCK_ROWS)
        ]
    if not out:
        z = logits.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def _grad_of_logits_(
    buf: Tensor, targets: Tensor, g_lp: Tensor, g_ent: Tensor | None, temperature: float
) -> None:
    """Overwrite the logits `buf` (chunk, V) with ∂(Σ g_lp·lp + g_ent·H)/∂logits, one row block at a time.

    With z = logits / T, p = softmax(z): ∂lp/∂z = onehot(y) − p and ∂H/∂z = −p·(log p + H).
    """
    for r in range(0, buf.shape[0], _BLOCK_ROWS):
        blk, y, gl = buf[r : r + _BLOCK_ROWS], targets[r : r + _BLOCK_ROWS], g_lp[r : r + _BLOCK_ROWS]
        g = _block_logp(blk, temperature)  # log p, then overwritten in place by the gradient
        p = g.exp()
        if g_ent is not None:
            ent = _entropy(p, g)
            # −p·(g_lp + g_ent·(log p + H)) + g_lp·onehot
            g.add_(ent[:, None]).mul_(g_ent[r : r + _BLOCK_ROWS, None]).add_(gl[:, None])
        else:
            g.copy_(gl[:, None].expand_as(g))
        g.mul_(p).neg_()
        del p
        g[torch.arange(g.shape[0], device=g.device), y] += gl
        if temperature != 1.0:
            g.div_(temperature)
        blk.copy_(g)


def _fp32(x: Tensor) -> Any:
    """No autocast: the log-softmax, entropy and their gradients stay float32 whatever the compute dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class _ChunkScores(torch.autograd.Function):
    """One chunk's log-probs and entropies; saves only the (chunk, H) input, recomputes logits in backward.

    The backward recomputes the chunk's logits under the forward's autocast state (the same numerics as
    the loss), overwrites them in place with their gradient (`_grad_of_logits_`, float32 math on row
    blocks), and pushes that through the head by autograd. A plain `nn.Linear` head saves its input and
    weight, not its output, so the logits' own storage is the gradient buffer: peak ≈ one (chunk, V)
    tensor in the head's dtype plus (16, V) float32 temporaries, in forward and backward alike.
    """

    @staticmethod
    def forward(  # noqa: ANN205
        ctx: Any, hidden: Tensor, targets: Tensor, parts: CausalLMParts, temperature: float, entropy: bool
    ):
        ctx.save_for_backward(hidden, targets)
        ctx.parts, ctx.temperature, ctx.entropy = parts, temperature, entropy
        kind = hidden.device.type
        ctx.amp = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        with torch.no_grad():
            return _chunk_scores(hidden, targets, parts.head, parts.post, temperature, entropy)

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor, g_ent: Tensor):  # noqa: ANN205
        hidden, targets = ctx.saved_tensors
        parts = ctx.parts
        kind, amp_on, amp_dtype = ctx.amp
        with torch.enable_grad(), torch.autocast(kind, dtype=amp_dtype, enabled=amp_on, cache_enabled=False):
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            logits = parts.head(h)
            if parts.post is not None:
                logits = parts.post(logits)
        with torch.no_grad(), _fp32(logits):
            # tanh (soft-capping) and unknown heads may save their output: give those a separate buffer
            reuse = parts.post is None and type(parts.head) is nn.Linear
            buf = logits.detach() if reuse else logits.detach().clone()
            _grad_of_logits_(
                buf, targets, g_lp.float(), g_ent.float() if ctx.entropy else None, ctx.temperature
            )
        torch.autograd.backward(logits, buf)  # head parameters' .grad and h.grad
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
