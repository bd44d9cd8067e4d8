"""Log-probs and entropies computed only where the loss needs them, a chunk of rows at a time.

A causal LM's vocabulary projection and fp32 log-softmax are the largest memory item of training with a
big vocabulary (152k for Qwen): (rows × slots × vocab) floats. Here the decoder runs once for hidden
states, the hidden state of each scored token's *parent slot* is gathered into an (N, H) matrix, and the
LM head + log-softmax run over `chunk` rows at a time. With gradients on, each chunk is checkpointed
(only its (chunk, H) input is saved; the logits are recomputed in the backward), so peak logits memory is
O(chunk × vocab) in forward and backward alike, whatever N is.

`split_causal_lm` finds the decoder and LM head of a transformers causal LM, also inside a peft wrapper
(LoRA layers live inside those modules, so calling them applies the adapter) and with tied embeddings
(the head is whatever `get_output_embeddings` returns). Models whose logits need more than the head
(Gemma's soft-capping, Cohere's logit scale) get that applied; anything not recognised returns None and
the caller falls back to the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

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
    logits = head(hidden)
    if post is not None:
        logits = post(logits)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1) if entropy else torch.zeros_like(lp)
    return lp, ent


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
            lp, ent = checkpoint(
                _chunk_scores, h, y, parts.head, parts.post, temperature, entropy, use_reentrant=False
            )
        else:
            lp, ent = _chunk_scores(h, y, parts.head, parts.post, temperature, entropy)
        lps.append(lp)
        ents.append(ent)
    lp_all = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
    ent_all = (torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32)) if entropy else None
    return lp_all, ent_all
