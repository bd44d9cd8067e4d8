"""What the run loop calls when it trains through generation servers (`policy.backend: openai`).

The trainer keeps its own model; the servers sample. `ServedTraining` bundles the three duties of the
loop around them, each a plain call with explicit inputs:

1. `begin(model, step)` before the first rollout: the servers take the trainer's starting weights.
2. `rollout_metrics(trainer_version)` after each rollout: the staleness guard (raises beyond
   `trainer.max_staleness`) and `train/staleness`, `rollout/server_prefix_hit`.
3. `after_update(model, step)` after each optimizer update: weight sync; returns the new version.

`logprob_mismatch_metric` gives `train/logprob_mismatch` from a packed batch's sampling-time and
recomputed log-probs. `OneStepOffRollouts` runs the rollout of step t+1 on a background thread while step
t trains (`trainer.async_rollouts: 1`): staleness is then at most 1. `StoppablePolicy` lets a stopping
run end an in-flight rollout at its next generation call instead of waiting for the whole step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from pathlib import Path
from typing import Any, Generic, TypeVar

from treegrpo.policies.routing import RoutedPolicy
from treegrpo.weight_sync import WeightSync, check_staleness, logprob_mismatch, make_weight_sync

R = TypeVar("R")


class ServedTraining:
    """Weight sync, staleness guard and server metrics for training on a `RoutedPolicy`."""

    def __init__(
        self,
        policy: RoutedPolicy,
        sync: WeightSync,
        max_staleness: int = 1,
        followers: Sequence[Any] = (),
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.policy = policy
        # Other served policies of this process (the greedy evaluation one): they follow every version.
        self.followers = [p for p in followers if isinstance(p, RoutedPolicy) and p is not policy]
        self.sync = sync
        self.max_staleness = max_staleness
        self._seen = (0, 0)  # (prompt tokens, prefill tokens) of the policy at the last metrics call
        self._servers_report_hits = False

    @classmethod
    def from_config(
        cls, cfg: Any, model: Any, policy: Any, run_dir: str | Path, followers: Sequence[Any] = ()
    ) -> ServedTraining | None:
        """The hooks for `cfg` (None unless `policy` is a served `RoutedPolicy`)."""
        if not isinstance(policy, RoutedPolicy):
            return None
        sync = make_weight_sync(
            cfg.policy.weight_sync, model, Path(run_dir) / "weight-sync", cfg.policy.base_url, policy
        )
        return cls(policy, sync, cfg.trainer.max_staleness, followers)

    def begin(self, model: Any, step: int, is_main: bool = True) -> int:
        """Before the first rollout (also after a resume): the servers serve the trainer's weights."""
        return self.after_update(model, step, is_main)

    def after_update(self, model: Any, step: int, is_main: bool = True) -> int:
        """After the optimizer update that produced weights `step`: push them to the servers.

        With several trainer processes only the main one saves and posts (`is_main`); the others call this
        with `is_main=False` after a barrier that follows the main one's call, and only switch their own
        policy to the new version (and, for LoRA, the adapter name).
        """
        version = self.sync.sync(model, step) if is_main else self.sync.follow(step)
        for p in self.followers:
            p.use_version(self.policy.version, model_name=self.policy.model_name)
        return version

    def rollout_metrics(self, trainer_version: int) -> dict[str, float]:
        """Staleness of the rollout just sampled (raises StaleRolloutError beyond the bound) and prefix hits."""
        versions = self.policy.take_versions()
        lag = check_staleness(trainer_version, versions, self.max_staleness)
        prompt, prefill = self.policy.stats["prompt_tokens"], self.policy.stats["prefill_tokens"]
        dp, df = prompt - self._seen[0], prefill - self._seen[1]
        self._seen = (prompt, prefill)
        out = {"train/staleness": float(lag)}
        # Servers that do not report cached tokens (vLLM without --enable-prompt-tokens-details) look like
        # a hit rate of 0: the metric appears once any server has reported a cached token.
        self._servers_report_hits = self._servers_report_hits or df < dp
        if dp > 0 and self._servers_report_hits:
            out["rollout/server_prefix_hit"] = 1.0 - df / dp
        return out


def logprob_mismatch_metric(batch: Any, recomputed: Any) -> dict[str, float]:
    """`train/logprob_mismatch` over a packed batch's loss tokens (sampler vs the trainer's recomputation)."""
    return {"train/logprob_mismatch": logprob_mismatch(batch.old_logprobs, recomputed, batch.loss_mask)}


class RolloutStopped(Exception):
    """The run is stopping: an in-flight one-step-off rollout gave up at its next generation call."""


class StoppablePolicy:
    """`policy` whose `generate` raises `RolloutStopped` once `stop` is set; everything else delegates."""

    def __init__(self, policy: Any, stop: threading.Event) -> None:
        self.policy = policy
        self.stop = stop

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.stop.is_set():
            raise RolloutStopped("the run is stopping")
        return self.policy.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


class OneStepOffRollouts(Generic[R]):
    """Rollouts one step ahead of training. The loop, per step t:

        rollout = ahead.get(t)                      # waits for step t's rollout (sampled now if not prefetched)
        metrics = served.rollout_metrics(version)   # nothing in flight: versions and counters are consistent
        ahead.prefetch(t + 1)                       # sampled on the servers with the weights of now
        ... train on rollout ...
        ahead.wait(t + 1)                           # the whole rollout of t + 1 saw the weights of t
        served.after_update(model, t + 1)

    `sample(step)` must only use what is safe to share with the training thread: the servers generate,
    the trainer's model is not touched. A weight sync during an in-flight rollout is fine: each request
    records the version it was sent with (a request racing a reload may be recorded one version older
    than it was served: staleness is never under-reported).
    """

    def __init__(self, sample: Callable[..., R], last_step: int | None = None) -> None:
        self.sample = sample  # sample(step, *args) -> the rollout of `step`
        self.last_step = last_step
        self.stop = threading.Event()  # set by close(); for a `StoppablePolicy` inside `sample`
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._pending: dict[int, Future[R]] = {}
        self._lock = threading.Lock()

    def prefetch(self, step: int, *args: Any, force: bool = False) -> None:
        """Start sampling `step` now (no-op if already started, or past `last_step` unless forced)."""
        if not force and self.last_step is not None and step > self.last_step:
            return
        with self._lock:
            if step not in self._pending:
                self._pending[step] = self._pool.submit(self.sample, step, *args)

    def get(self, step: int, *args: Any) -> R:
        """Step `step`'s rollout (sampled now, from `args`, if it was not prefetched)."""
        self.prefetch(step, *args, force=True)
        with self._lock:
            fut = self._pending.pop(step)
        return fut.result()  # re-raises the rollout's exception in the training thread

    def wait(self, step: int) -> float:
        """Block until the prefetched rollout of `step` (if any) is done; the seconds waited."""
        with self._lock:
            fut = self._pending.get(step)
        if fut is None:
            return 0.0
        t0 = time.perf_counter()
        wait_all([fut])
        return time.perf_counter() - t0

    @property
    def in_flight(self) -> list[int]:
        with self._lock:
            return sorted(s for s, f in self._pending.items() if not f.done())

    def close(self) -> None:
        """Stop: pending rollouts are cancelled, a running one ends at its next `StoppablePolicy` call."""
        self.stop.set()
        with self._lock:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=True)
