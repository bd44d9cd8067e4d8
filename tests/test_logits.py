"""Chunked loss-position logits: exact log-probs, entropies and gradients; about one chunk of logits at peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from treegrpo.logits import CausalLMParts, token_scores

ROOT = Path(__file__).resolve().parents[1]


def reference(h: torch.Tensor, y: torch.Tensor, head: nn.Module, temperature: float, post=None):
    """Plain autograd: the full logits of every row, float32 log-softmax."""
    logits = head(h)
    if post is not None:
        logits = post(logits)
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def grads_of(fn, h, head):
    h.grad, head.weight.grad = None, None
    lp, ent = fn()
    w = torch.linspace(-1.0, 1.0, lp.shape[0])  # distinct weights per row: a wrong row shows
    ((w * lp).sum() + (w.flip(0) * ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("post", [None, "softcap"])
@pytest.mark.parametrize("chunk,rows", [(7, 50), (32, 96), (1024, 33)])
def test_scores_and_gradients_equal_the_full_logits(chunk, rows, post):
    torch.manual_seed(0)
    head = nn.Linear(16, 301, bias=False)
    cap = (lambda x: torch.tanh(x / 5.0) * 5.0) if post else None
    parts = CausalLMParts(decoder=nn.Identity(), head=head, post=cap)
    h = torch.randn(rows, 16, requires_grad=True)
    y = torch.randint(0, 301, (rows,))
    got = grads_of(lambda: token_scores(h, y, parts, 0.7, chunk, True), h, head)
    want = grads_of(lambda: reference(h, y, head, 0.7, cap), h, head)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_bf16_autocast_backward_recomputes_with_the_forwards_numerics():
    """Under bf16 autocast the backward's recomputed logits are bf16 too, so the gradients are those of
    the loss that was computed (checked against plain autograd under the same autocast)."""
    torch.manual_seed(1)
    head = nn.Linear(32, 517, bias=False)
    parts = CausalLMParts(decoder=nn.Identity(), head=head, post=None)
    h = torch.randn(64, 32, requires_grad=True)
    y = torch.randint(0, 517, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        got = grads_of(lambda: token_scores(h, y, parts, 1.0, 16, True), h, head)
        want = grads_of(lambda: reference(h, y, head, 1.0), h, head)
    assert (got[0] - want[0]).abs().max().item() < 1e-5  # the same bf16 logits, float32 math
    for a, b in zip(got[2:], want[2:], strict=True):
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()  # bf16 gradient rounding only


PEAK = """
import json, sys, torch
from torch import nn
sys.path.insert(0, "benchmarks")
import peak_memory
from treegrpo.logits import CausalLMParts, token_scores
torch.manual_seed(0)
V, H, chunk = 8192, 64, 512
head = nn.Linear(H, V, bias=False)
parts = CausalLMParts(decoder=nn.Identity(), head=head, post=None)
h = torch.randn(4 * chunk, H, requires_grad=True)
y = torch.randint(0, V, (4 * chunk,))
def run():
    lp, ent = token_scores(h, y, parts, 0.7, chunk, True)
    (lp.sum() + ent.sum()).backward()
run()
peak, _ = peak_memory.peak_mb(run, torch.device("cpu"))
print(json.dumps({"peak": peak, "unit": chunk * V * 4 / 2**20}))
"""


def test_peak_memory_is_about_one_chunk_of_float32_logits():
    """Forward + backward of 4 chunks: the peak is about one (chunk, V) float32 tensor (the old path held
    three: logits, a float32 buffer and p), measured as resident memory in a process whose every tensor
    over 64 KiB is its own mmap (benchmarks/peak_memory.py)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", PEAK], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.9 * r["unit"] < r["peak"] < 1.3 * r["unit"], r
