"""Progress display for long work: rich bars for warm start and training, or plain lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    """Warm-start and training bars with live reward / EM / token counts (plain log lines if disabled)."""

    def __init__(self, enabled: bool = True, quiet: bool = False) -> None:
        self.quiet = quiet  # non-main processes of a multi-process run print nothing
        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        self._train_task: Any = None
        self._sft_task: Any = None
        self._eval_em: float | None = None
        self._plain = not self.enabled

    def __enter__(self) -> RunProgress:
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.log(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def sft_callback(self, every_s: float = 30.0) -> Callable[[int, int, float], None]:
        """Progress of the warm start: a bar on a terminal, else a line every 50 steps and at least every
        `every_s` seconds (a pretrained model's SFT step can take minutes on a CPU)."""
        last = time.monotonic()

        def on_step(step: int, total: int, loss: float) -> None:
            nonlocal last
            if self.progress is not None:
                if self._sft_task is None:
                    self._sft_task = self.progress.add_task("warm start (SFT)", total=total, info="")
                self.progress.update(self._sft_task, completed=step, info=f"loss {loss:.3f}")
            elif not self.quiet and (step == total or step % 50 == 0 or time.monotonic() - last >= every_s):
                print(f"warm start: step {step}/{total} loss {loss:.3f}", file=sys.stderr, flush=True)
                last = time.monotonic()

        return on_step

    def start_training(self, total: int, done: int) -> None:
        if self.progress is not None:
            self._train_task = self.progress.add_task("Tree-GRPO", total=total, completed=done, info="")

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.quiet:
            return
        if m.get("eval/em") is not None:
            self._eval_em = float(m["eval/em"])
        em = f" eval EM {self._eval_em:.3f}" if self._eval_em is not None else ""
        info = (
            f"reward {m.get('train/reward_mean', 0.0):.3f}{em} "
            f"gen tok {int(m.get('budget/cum_generated_tokens', 0)):,} "
            f"{m.get('time/step_seconds', 0.0):.1f}s/step"
        )
        if self.progress is not None and self._train_task is not None:
            self.progress.update(self._train_task, completed=step, info=info)
        else:
            print(f"step {step}: {info}", file=sys.stderr, flush=True)

    def summary(self, s: dict[str, Any]) -> None:
        lines = ["", "== treegrpo run summary =="]
        for k, v in s.items():
            if isinstance(v, float):
                v = f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
            lines.append(f"  {k}: {v}")
        print("\n".join(lines), flush=True)
