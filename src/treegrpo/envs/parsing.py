"""Parse one generated agent step into an action (SPEC §2).

The step is cut at the FIRST ``</search>`` or ``</answer>``: whatever the model wrote after the
first action end tag (e.g. the tail of the token that contained the tag) is not part of the action.
The action's content is the text after the LAST matching opening tag before that cut, so
``<search>a <search>b</search>`` searches for ``b``. The parser is total: any input, including
binary junk, huge strings, nested or unbalanced tags, gives a :class:`ParsedStep` and never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StepKind = Literal["search", "answer", "invalid"]

_CLOSERS = (("search", "</search>"), ("answer", "</answer>"))


@dataclass(frozen=True)
class ParsedStep:
    """kind: the action; content: the query or answer (stripped); cut_text: the step up to and
    including the first action end tag (the whole text when there is none)."""

    kind: StepKind
    content: str
    cut_text: str


def _to_text(text: object) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    return "" if text is None else str(text)


def parse_step(text: object) -> ParsedStep:
    """Classify a generated step as a search, an answer, or an invalid action."""
    try:
        s = _to_text(text)
    except Exception:  # a str() that raises: treat as an empty, invalid step
        return ParsedStep("invalid", "", "")
    first_kind: StepKind | None = None
    first_close = -1
    first_tag = ""
    for kind, closer in _CLOSERS:
        i = s.find(closer)
        if i >= 0 and (first_close < 0 or i < first_close):
            first_kind, first_close, first_tag = kind, i, closer  # type: ignore[assignment]
    if first_kind is None:
        return ParsedStep("invalid", "", s)
    cut = s[: first_close + len(first_tag)]
    opener = f"<{first_kind}>"
    open_at = s.rfind(opener, 0, first_close)
    if open_at < 0:
        return ParsedStep("invalid", "", cut)
    content = s[open_at + len(opener) : first_close].strip()
    return ParsedStep(first_kind, content, cut)


__all__ = ["ParsedStep", "StepKind", "parse_step"]
