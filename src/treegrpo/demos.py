"""Demonstrations from a jsonl file, for the warm start of any environment (``warmstart.demos_path``).

One JSON object per line: the dataset row (``question``, ``golden_answers``, ...) plus either

- ``"steps"``: the agent's step texts, exactly as the model should write them (tag environments:
  ``["<calc> 12*7 </calc>", "<answer> 84 </answer>"]``), or
- ``"messages"``: a chat transcript; its assistant messages become the steps (a tool-calling
  environment renders their ``tool_calls`` in its own format via ``render_demo_step``; other
  environments take the content). ``tool`` / ``user`` messages in it are ignored: the
  demonstration is replayed through the environment, so the observations are the real ones and the
  SFT data is exactly what RL will see.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treegrpo.data import normalize_row
from treegrpo.errors import UserError


class DemoError(UserError, ValueError):
    """A demonstrations file that cannot be read; the message names the file and line."""


def _steps_from_messages(messages: Any, env: Any, where: str) -> list[str]:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise DemoError(f"{where}: 'messages' must be a list of chat messages")
    render = getattr(env, "render_demo_step", None)
    steps = []
    for m in messages:
        if m.get("role") != "assistant":
            continue
        text = render(m) if callable(render) else str(m.get("content") or "")
        if text:
            steps.append(text)
    return steps


def with_steps(demos: list[Any], env: Any) -> list[Any]:
    """Demonstrations given as chat ``messages`` (a task's, or a file's) turned into step texts."""
    out: list[Any] = []
    for d in demos:
        if isinstance(d, Mapping) and "messages" in d and "steps" not in d:
            where = f"demonstration {d.get('row', {}).get('group_id', len(out))}"
            out.append({"row": d["row"], "steps": _steps_from_messages(d["messages"], env, where)})
        else:
            out.append(d)
    return out


def load_demonstrations(path: str | Path, env: Any = None, limit: int | None = None) -> list[dict[str, Any]]:
    """``[{"row": normalized row, "steps": [str, ...]}]`` from a jsonl file (the first `limit` lines)."""
    p = Path(path)
    if not p.is_file():
        raise DemoError(f"warmstart.demos_path: {p} does not exist")
    demos: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and len(demos) >= limit:
                break
            where = f"{p} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DemoError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, Mapping):
                raise DemoError(f"{where}: a demonstration must be a JSON object")
            raw = obj.get("row", {k: v for k, v in obj.items() if k not in ("steps", "messages")})
            row = normalize_row(raw, where, len(demos), "demo")
            if "steps" in obj:
                steps = obj["steps"]
                if not isinstance(steps, list) or not all(isinstance(s, str) and s for s in steps):
                    raise DemoError(f"{where}: 'steps' must be a list of non-empty strings")
            elif "messages" in obj:
                steps = _steps_from_messages(obj["messages"], env, where)
            else:
                raise DemoError(f"{where}: needs 'steps' (step texts) or 'messages' (a chat transcript)")
            if not steps:
                raise DemoError(f"{where}: the demonstration has no agent step")
            demos.append({"row": row, "steps": list(steps)})
    if not demos:
        raise DemoError(f"warmstart.demos_path: {p} holds no demonstrations")
    return demos


__all__ = ["DemoError", "load_demonstrations", "with_steps"]
