"""The ``search`` tool: the configured retriever (BM25 or a Search-R1 server) as a plain function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def make_search_tool(retriever: Any, topk: int = 3) -> Callable[[str], str]:
    """A `search(query)` function over `retriever`, rendering passages like Search-R1 does."""
    from treegrpo.envs.search_r1 import format_passages

    def search(query: str) -> str:
        """Search the knowledge base and return the top passages.

        Args:
            query: What to look up, for example "capital of France".
        """
        hits = retriever.search([query], topk)
        if not isinstance(hits, list) or len(hits) != 1:
            raise RuntimeError("the retriever returned a malformed answer")
        passages = list(hits[0])[:topk]
        return format_passages(passages) if passages else "No documents were found for this query."

    return search


__all__ = ["make_search_tool"]
