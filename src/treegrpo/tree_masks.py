"""Attention masks for tree rows, built on the model's device from one (R, T) tensor of subtree ends.

A tree row lays each tree's tokens out in DFS preorder, every node's tokens contiguous and every subtree
contiguous. Slot j's node is an ancestor of (or the same node as) slot i's node exactly when
j ≤ i < end[j], where end[j] is the slot just past the last token of the subtree of j's node. Several trees
in one row are then block-diagonal for free (a tree's subtree ends at its last slot), and a pad slot
(end = its own index + 1) sees only itself, so no attention row is fully masked (NaN with sdpa).

Forms, by attention implementation:
- `eager` and `sdpa`: an additive float mask in the model dtype (0 allowed, dtype-min masked). A boolean
  mask runs but is wrong with `eager` (it is added to the scores); `sdpa` takes one but converts it to a
  float copy internally (measured on CPU, 8×4×1024² fwd+bwd: bool 53 MB extra, float 21 MB, is_causal
  21 MB), so a float mask is both right and smaller. With a float mask CPU `sdpa` runs its flash kernel and
  never materialises the (heads, T, T) scores.
- `flex_attention` (CUDA): a `BlockMask` from a mask_mod of the same test; memory O(T²/block²) and blocks
  that are fully masked are skipped. On CPU torch 2.13 has its forward only.
The dense forms are (R, 1, T, T): built per forward from device tensors, never copied from the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def visibility(subtree_end: Tensor) -> Tensor:
    """(R, 1, T, T) bool: query slot i may attend key slot j (same device as `subtree_end`)."""
    t = subtree_end.shape[-1]
    idx = torch.arange(t, device=subtree_end.device)
    causal = idx[None, :] <= idx[:, None]  # (T_q, T_kv): j ≤ i
    inside = idx[None, :, None] < subtree_end[:, None, :]  # (R, T_q, T_kv): i < end[j]
    return (causal[None] & inside)[:, None]


def dense_tree_mask(subtree_end: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """The (R, 1, T, T) additive mask in `dtype` (0 allowed, dtype-min masked) for eager / sdpa."""
    del attn_implementation  # same form for both (see the module doc)
    allowed = visibility(subtree_end)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def flex_block_mask(subtree_end: Tensor, block_size: int = 128):  # noqa: ANN201 - BlockMask
    """A FlexAttention `BlockMask` of the same visibility, on `subtree_end`'s device."""
    from torch.nn.attention.flex_attention import create_block_mask

    end = subtree_end

    def tree_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv <= q) & (q < end[b, kv])

    r, t = end.shape
    return create_block_mask(
        tree_mod, B=r, H=None, Q_LEN=t, KV_LEN=t, device=end.device, BLOCK_SIZE=block_size
    )


def tree_attention_mask(subtree_end: Tensor, attn_implementation: str, dtype: torch.dtype):  # noqa: ANN201 - Tensor | BlockMask
    """The mask to pass as `attention_mask` for tree rows under `attn_implementation`."""
    if attn_implementation == "flex_attention":
        return flex_block_mask(subtree_end)
    return dense_tree_mask(subtree_end, attn_implementation, dtype)
