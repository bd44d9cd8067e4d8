"""Test helpers: policy servers on threads of the test process (real HTTP on 127.0.0.1).

For the training-through-serve-policy test (after the trainer integration):

    cfg = load_config(tiny_config)
    with served_run_model(cfg, n=2) as urls:
        cfg = load_config(tiny_config, ["policy.backend=openai", f"policy.base_url={','.join(urls)}"])
        summary = train(cfg)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

from treegrpo.policy_engine import PolicyEngine
from treegrpo.policy_server import BackgroundServer, ServerLimits, engine_for_config


@contextlib.contextmanager
def serve_models(
    models: Sequence[Any], tokenizer: Any, name: str = "tiny", limits: ServerLimits | None = None
) -> Iterator[list[BackgroundServer]]:
    """One server per model (each on its own deep copy, so the caller's model is never touched)."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                BackgroundServer(PolicyEngine(copy.deepcopy(m), tokenizer, name=name), limits)
            )
            for m in models
        ]


@contextlib.contextmanager
def served_run_model(cfg: Any, n: int = 1, checkpoint: str | None = None) -> Iterator[list[str]]:
    """`n` servers of the model `train` builds from `cfg` (what `treegrpo serve-policy` serves); their URLs."""
    engine = engine_for_config(cfg, checkpoint)
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                BackgroundServer(
                    PolicyEngine(
                        copy.deepcopy(engine.model),
                        engine.tokenizer,
                        name=engine.name,
                        version=engine.version,
                    )
                )
            )
            for _ in range(n)
        ]
        yield [s.url for s in servers]
