"""Strict parsing and guarded execution of Hermes-style tool calls (``<tool_call>{json}</tool_call>``).

Model output is untrusted: every failure — malformed JSON, an unknown tool, missing or unexpected
arguments, wrong argument types, a tool that raises or runs past its timeout — becomes an error text
for the tool message, never an exception. The parser is total (any input gives a result).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
MAX_CALLS_PER_STEP = 8
MAX_RESULT_CHARS = 2000

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: a valid one has `error == ""`; an invalid one says why."""

    name: str
    arguments: Mapping[str, Any]
    error: str = ""


def has_tool_call(text: str) -> bool:
    """Did the step try to call a tool at all (even a malformed call)?"""
    return isinstance(text, str) and OPEN in text


def _type_ok(value: Any, schema: Mapping[str, Any]) -> bool:
    types = schema.get("type")
    if types is None:
        return True
    names = [types] if isinstance(types, str) else list(types)
    for name in names:
        allowed = _JSON_TYPES.get(str(name))
        if allowed is None:
            return True  # a type we do not check
        if isinstance(value, bool) and name in ("integer", "number"):
            continue
        if isinstance(value, allowed):
            return "enum" not in schema or value in schema["enum"]
    return False


def check_arguments(arguments: Any, schema: Mapping[str, Any]) -> str:
    """'' when `arguments` fit the function schema's parameters, else why not."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    params = schema.get("parameters", {}) or {}
    props: Mapping[str, Any] = params.get("properties", {}) or {}
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        return f"missing required argument(s): {', '.join(missing)}"
    unknown = [a for a in arguments if a not in props]
    if unknown:
        return f"unexpected argument(s): {', '.join(map(str, unknown))}"
    for name, value in arguments.items():
        if not _type_ok(value, props[name]):
            want = props[name].get("type")
            return f"argument {name!r} must be of type {want}, got {type(value).__name__}"
    return ""


def parse_tool_calls(text: object, schemas: Mapping[str, Mapping[str, Any]]) -> list[ToolCall]:
    """Every ``<tool_call>`` block of a step, validated against `schemas` (tool name → function schema)."""
    try:
        s = text if isinstance(text, str) else str(text)
    except Exception:
        return [ToolCall("", {}, "the step is not text")]
    calls: list[ToolCall] = []
    end = 0
    for m in _BLOCK.finditer(s):
        end = m.end()
        if len(calls) >= MAX_CALLS_PER_STEP:
            calls.append(ToolCall("", {}, f"more than {MAX_CALLS_PER_STEP} tool calls in one step"))
            break
        calls.append(_parse_one(m.group(1), schemas))
    if OPEN in s[end:]:
        calls.append(ToolCall("", {}, f"unterminated tool call: {OPEN} without {CLOSE}"))
    return calls


def _parse_one(body: str, schemas: Mapping[str, Mapping[str, Any]]) -> ToolCall:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:
        return ToolCall("", {}, f"malformed tool call JSON ({str(e)[:80]})")
    if not isinstance(obj, dict):
        return ToolCall("", {}, 'a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, 'a tool call needs a "name" string')
    if name not in schemas:
        known = ", ".join(sorted(schemas)) or "none"
        return ToolCall(name[:80], {}, f"unknown tool {name[:80]!r} (available: {known})")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return ToolCall(name, {}, "arguments must be a JSON object")
    err = check_arguments(args, schemas[name])
    return ToolCall(name, args if isinstance(args, dict) else {}, err)


def _clip(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + " …[truncated]"


def _runner(fn: Callable[..., Any], kwargs: dict[str, Any], out: list[Any]) -> Callable[[], None]:
    def target() -> None:
        try:
            out.append(("ok", fn(**kwargs)))
        except BaseException as e:  # noqa: BLE001 - a tool's failure is an observation
            out.append(("err", f"{type(e).__name__}: {e}"))

    return target


def run_tool_calls(
    calls: Sequence[ToolCall], tools: Mapping[str, Callable[..., Any]], timeout: float
) -> list[tuple[str, bool]]:
    """(result text, failed) per call; valid calls run concurrently, each under `timeout` seconds.

    A call that times out is reported and abandoned: its thread is a daemon, so a hung plain-Python
    tool cannot block the run (it keeps a thread until it returns; the python tool is a subprocess
    with its own limits and is always reaped).
    """
    results: list[tuple[str, bool] | None] = [None] * len(calls)
    threads: list[tuple[int, threading.Thread, list[Any]]] = []
    for i, call in enumerate(calls):
        if call.error:
            results[i] = (f"Error: {call.error}", True)
            continue
        box: list[Any] = []
        target = _runner(tools[call.name], dict(call.arguments), box)
        t = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
        t.start()
        threads.append((i, t, box))
    deadline = time.monotonic() + timeout
    for i, t, box in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if not box:
            results[i] = (f"Error: tool {calls[i].name!r} timed out after {timeout:g} s", True)
        elif box[0][0] == "err":
            results[i] = (_clip(f"Error: {box[0][1]}"), True)
        else:
            value = box[0][1]
            try:
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            except Exception:  # noqa: BLE001
                text = repr(value)
            results[i] = (_clip(text), False)
    return [r if r is not None else ("Error: no result", True) for r in results]


__all__ = [
    "CLOSE",
    "OPEN",
    "ToolCall",
    "check_arguments",
    "has_tool_call",
    "parse_tool_calls",
    "run_tool_calls",
]
