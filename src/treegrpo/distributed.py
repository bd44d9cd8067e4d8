"""Every collective of a training run, in one small object: world, rank, device and the reductions.

Each process holds a full copy of the model, samples and trains its own whole forests, and the
gradients are summed once per optimizer step (`all_reduce_gradients`). There is no DDP wrapper: the
update decides when to synchronize, so every rank runs the same collectives in the same order however
its trees are shaped, and a micro-batch may call the model any number of times. With one process every
method is a no-op that returns its input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from treegrpo.errors import UserError

_BUCKET_BYTES = 64 << 20  # gradients are all-reduced in flat buckets of about this size


@dataclass
class DistContext:
    """The process group of this run (torchrun / accelerate launch environment) and its collectives."""

    world: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_environment(cls) -> DistContext:
        """Join the process group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR ...), if any."""
        refuse_sharded_launch(os.environ)
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(world=state.num_processes, rank=state.process_index, device=state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group. A gloo group left for interpreter exit can abort the process
        ("terminate called without an active exception", exit -6) after a successful run."""
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _reduce(self, values: Sequence[float], op: torch.distributed.ReduceOp) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        return self._reduce(values, torch.distributed.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over processes."""
        return self._reduce(values, torch.distributed.ReduceOp.MAX)

    def all_true(self, flag: bool) -> bool:
        """True on every process iff `flag` is true on every process (so all take the same branch)."""
        return self.sum([1.0 if flag else 0.0])[0] == self.world

    def sum_dict(self, values: Mapping[str, float]) -> dict[str, float]:
        keys = sorted(values)
        return dict(zip(keys, self.sum([values[k] for k in keys]), strict=True))

    def union(self, keys: Iterable[str]) -> list[str]:
        """The sorted union of every process's `keys` (so a reduction over them pairs up everywhere)."""
        mine = sorted(set(keys))
        if self.world == 1:
            return mine
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, mine)
        return sorted({k for ks in gathered for k in ks})

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block first (e.g. builds a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Copy process 0's parameters and buffers to every process (what DDP does when it wraps a model),
        so ranks start identical even if something in model building depended on the rank."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    def all_reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every trainable parameter's gradient over processes, in flat buckets.

        A parameter without a gradient on this rank (it took no part in this rank's micro-batches)
        contributes zeros, so all ranks reduce the same tensors in the same order.
        """
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world == 1:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= _BUCKET_BYTES:
                _reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def refuse_sharded_launch(env: Mapping[str, str]) -> None:
    """FSDP and DeepSpeed configs would be silently ignored (every rank holds the whole model): refuse them."""
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise UserError(
            "accelerate FSDP: not supported; treegrpo keeps a full model copy per process and sums "
            "gradients (launch with torchrun or an accelerate MULTI_GPU / MULTI_CPU config)"
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise UserError(
            "accelerate DeepSpeed: not supported; treegrpo keeps a full model copy per process and sums "
            "gradients (launch with torchrun or an accelerate MULTI_GPU / MULTI_CPU config)"
        )
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("", "no"):
        raise UserError(
            f"accelerate mixed_precision: {mp} is not read by treegrpo; set model.dtype: bfloat16 "
            "(fp32 master weights, bf16 compute) and launch with mixed_precision: no"
        )
