"""What every retriever returns and how corpora are read.

One ``search`` call takes the queries of ALL active branches at once, so a remote or batched
backend sees one request per environment step instead of one per branch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from treegrpo.errors import UserError


class RetrieverError(UserError, RuntimeError):
    """A retriever could not answer (server down, timeout, bad reply). Environments turn it into an
    observation; it never ends a rollout."""


class CorpusError(UserError, ValueError):
    """A corpus file is missing, unreadable or has a malformed row (the message names file and line)."""


@dataclass(frozen=True)
class Passage:
    """One retrieved document."""

    id: str
    title: str
    text: str
    score: float = 0.0

    @property
    def contents(self) -> str:
        """Search-R1's single-field rendering: title on the first line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Retriever(Protocol):
    """Anything with a batched ``search`` is a retriever."""

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """Top-``topk`` passages for each query, best first (possibly fewer, possibly none)."""
        ...


def _strip_quotes(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1].strip()
    return s


def split_contents(contents: str) -> tuple[str, str]:
    """Search-R1 ``contents`` → (title, text): the first line is the (maybe quoted) title."""
    first, _, rest = contents.partition("\n")
    return _strip_quotes(first), rest.strip()


def document_to_passage(doc: Mapping[str, Any], score: float = 0.0, fallback_id: str = "") -> Passage:
    """Read a document in either corpus schema: ``{"id","title","text"}`` or ``{"id","contents"}``.

    Raises ValueError (naming the missing field) for anything else.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"document must be an object, got {type(doc).__name__}")
    raw_id = doc.get("id", fallback_id)
    doc_id = str(raw_id) if raw_id is not None else fallback_id
    if "text" in doc:
        title, text = doc.get("title", ""), doc["text"]
        if not isinstance(text, str) or not isinstance(title, str | type(None)):
            raise ValueError("document 'title' and 'text' must be strings")
        return Passage(doc_id, title or "", text, float(score))
    if "contents" in doc:
        contents = doc["contents"]
        if not isinstance(contents, str):
            raise ValueError("document 'contents' must be a string")
        title, text = split_contents(contents)
        return Passage(doc_id, title, text, float(score))
    raise ValueError("document has neither 'text' nor 'contents'")


def load_corpus(path: str | Path) -> list[dict[str, str]]:
    """Read a jsonl corpus into ``[{"id", "title", "text"}]``.

    Accepts our schema ``{"id","title","text"}`` and Search-R1's ``{"id","contents"}`` (title = first
    line of contents, surrounding quotes removed). A row without ``id`` gets its 0-based row number.
    Blank lines are skipped; a malformed row or an empty file raises :class:`CorpusError`.
    """
    p = Path(path)
    docs: list[dict[str, str]] = []
    try:
        with open(p, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{p}:{lineno}: invalid JSON ({e.msg})") from e
                try:
                    passage = document_to_passage(row, fallback_id=str(len(docs)))
                except ValueError as e:
                    raise CorpusError(f"{p}:{lineno}: {e}") from e
                docs.append({"id": passage.id, "title": passage.title, "text": passage.text})
    except OSError as e:
        raise CorpusError(f"cannot read corpus {p}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p}: not UTF-8 text ({e.reason})") from e
    if not docs:
        raise CorpusError(f"corpus {p} has no documents")
    return docs


__all__ = [
    "CorpusError",
    "Passage",
    "Retriever",
    "RetrieverError",
    "document_to_passage",
    "load_corpus",
    "split_contents",
]
