"""Client for the Search-R1 retrieval-server protocol (stdlib ``urllib`` only).

``POST /retrieve {"queries": [...], "topk": k, "return_scores": true}`` →
``{"result": [[{"document": {...}, "score": s}, ...], ...]}`` where a document is
``{"id","contents"}`` (Search-R1) or ``{"id","title","text"}``. Every failure (connection refused,
timeout, 5xx, garbage or mis-shaped JSON) is retried a bounded number of times with exponential
backoff, then raised as :class:`RetrieverError` — environments turn that into an observation.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from treegrpo.retrievers.base import Passage, RetrieverError, document_to_passage


def _endpoint(url: str) -> str:
    """Accept a base URL (``http://host:port``) or the full ``…/retrieve`` endpoint."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"retriever url must look like http://host:port[/retrieve], got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/retrieve"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def parse_response(payload: Any, n_queries: int, topk: int) -> list[list[Passage]]:
    """Validate a server reply and turn it into passages; ValueError says what was wrong."""
    if not isinstance(payload, dict) or not isinstance(payload.get("result"), list):
        raise ValueError("reply is not an object with a 'result' list")
    result = payload["result"]
    if len(result) != n_queries:
        raise ValueError(f"reply has {len(result)} result lists for {n_queries} queries")
    out: list[list[Passage]] = []
    for qi, hits in enumerate(result):
        if not isinstance(hits, list):
            raise ValueError(f"result[{qi}] is not a list")
        passages: list[Passage] = []
        for hi, hit in enumerate(hits[:topk]):
            if isinstance(hit, dict) and isinstance(hit.get("document"), dict):
                doc, score = hit["document"], hit.get("score", 0.0)
            else:  # return_scores=false servers send the documents themselves
                doc, score = hit, 0.0
            try:
                passages.append(document_to_passage(doc, float(score), fallback_id=f"{qi}-{hi}"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"result[{qi}][{hi}]: {e}") from e
        out.append(passages)
    return out


class HTTPRetriever:
    """Remote retriever: one POST per ``search`` call carrying every query of the step, split into
    requests of at most ``max_batch`` queries (servers bound the queries per request; ours at 4096)."""

    def __init__(
        self,
        url: str,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        max_batch: int = 1024,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {backoff}")
        self.url = _endpoint(url)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self._sleep = sleep

    def _post_once(self, body: bytes) -> Any:
        req = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            raw = resp.read()
        return json.loads(raw.decode("utf-8"))

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """Batched remote search; raises RetrieverError after ``1 + max_retries`` failed attempts."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        queries = [str(q) for q in queries]
        if not queries:
            return []
        if len(queries) > self.max_batch:
            out: list[list[Passage]] = []
            for s in range(0, len(queries), self.max_batch):
                out.extend(self.search(queries[s : s + self.max_batch], topk))
            return out
        body = json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode("utf-8")
        last = "no attempt made"
        attempts = 1 + self.max_retries
        for attempt in range(attempts):
            if attempt:
                self._sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                return parse_response(self._post_once(body), len(queries), topk)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # the request itself is wrong: retrying cannot help
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
            except (ValueError, UnicodeDecodeError) as e:  # includes json.JSONDecodeError
                last = f"bad reply: {e}"
        raise RetrieverError(f"retriever {self.url} failed after {attempt + 1} attempt(s): {last}")


__all__ = ["HTTPRetriever", "parse_response"]
