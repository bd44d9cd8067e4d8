"""Agent environments. Built-ins by name; anything implementing
:class:`treegrpo.protocols.Environment` can be named by import path (``my_pkg.my_env:MyEnv``)."""

from __future__ import annotations

from typing import Any

from treegrpo.envs.parsing import ParsedStep, parse_step
from treegrpo.envs.search_r1 import INVALID_ACTION_OBS, SearchR1Env, SearchState

ENVS: dict[str, Any] = {"search_r1": SearchR1Env, "tools": "treegrpo.envs.tools:ToolsEnv"}


def get_env_class(name_or_path: str) -> Any:
    """A built-in environment class by name, or a user's class/factory by import path."""
    if name_or_path in ENVS:
        env = ENVS[name_or_path]
        if isinstance(env, str):  # imported on demand (the tools env pulls in more)
            from treegrpo.plugins import load_callable

            return load_callable(env)
        return env
    if ":" not in name_or_path and "." not in name_or_path:
        raise ValueError(
            f"unknown environment {name_or_path!r}; built-ins: {sorted(ENVS)} or 'pkg.module:Env'"
        )
    from treegrpo.plugins import load_callable

    return load_callable(name_or_path)


__all__ = [
    "ENVS",
    "INVALID_ACTION_OBS",
    "ParsedStep",
    "SearchR1Env",
    "SearchState",
    "get_env_class",
    "parse_step",
]
