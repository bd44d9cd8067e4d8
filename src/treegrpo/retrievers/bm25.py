"""BM25 over a local corpus with ``bm25s`` (numpy only, no Java).

The index is built once and saved in the cache directory (``<cache_dir>/bm25/<corpus name>-<hash of
its path>/``, never next to the corpus, whose directory may be read-only or shared) with a manifest of
the corpus file's size and mtime, so later runs (and every worker sharing the cache) reload it instead
of re-indexing; a changed corpus is re-indexed. Saving is best effort: an unwritable cache only costs
the reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
from bm25s.stopwords import STOPWORDS_EN

from treegrpo.retrievers.base import CorpusError, Passage, load_corpus

log = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(STOPWORDS_EN)
_FORMAT = "treegrpo-bm25s-1"  # bump when tokenization or layout changes: old indexes go stale
_MANIFEST = "treegrpo_manifest.json"


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens minus English stopwords (shared by indexing and querying)."""
    return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _STOP]


DEFAULT_CACHE_DIR = ".cache/treegrpo"  # the default `cache_dir` of a run config


def index_dir_for(corpus_path: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where the index of `corpus_path` lives: one directory per corpus file (by resolved path)."""
    resolved = Path(corpus_path).resolve()
    key = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / "bm25" / f"{resolved.name}-{key}"


def _doc_text(doc: dict[str, str]) -> str:
    return f"{doc.get('title', '')}\n{doc.get('text', '')}"


class BM25Retriever:
    """In-process BM25 retriever. Give ``docs`` (``[{"id","title","text"}]``) or ``corpus_path``.

    A corpus file's index is cached under ``cache_dir`` unless ``index_dir`` names the place.
    """

    def __init__(
        self,
        docs: Sequence[dict[str, str]] | None = None,
        corpus_path: str | Path | None = None,
        index_dir: str | Path | None = None,
        k1: float = 1.5,
        b: float = 0.75,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
    ) -> None:
        if (docs is None) == (corpus_path is None):
            raise ValueError("BM25Retriever needs exactly one of docs= or corpus_path=")
        self.k1, self.b = float(k1), float(b)
        if corpus_path is not None:
            corpus_path = Path(corpus_path)
            self.docs = load_corpus(corpus_path)
            st = corpus_path.stat()
            fingerprint = f"file:{st.st_size}:{st.st_mtime_ns}"
            if index_dir is None:
                index_dir = index_dir_for(corpus_path, cache_dir)
        else:
            self.docs = self._check_docs(docs or [])
            h = hashlib.sha256()
            for d in self.docs:
                h.update(json.dumps([d["id"], d["title"], d["text"]], ensure_ascii=False).encode())
            fingerprint = f"docs:{h.hexdigest()}"
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._manifest = {
            "format": _FORMAT,
            "fingerprint": fingerprint,
            "n_docs": len(self.docs),
            "k1": self.k1,
            "b": self.b,
        }
        self._lock = threading.Lock()
        self.loaded_from_disk = False
        self._bm25 = self._load() if self.index_dir is not None else None
        if self._bm25 is None:
            self._bm25 = self._build()
            if self.index_dir is not None:
                self._save()
        else:
            self.loaded_from_disk = True

    @staticmethod
    def _check_docs(docs: Sequence[Any]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for i, d in enumerate(docs):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise CorpusError(f"docs[{i}] must be a dict with a string 'text'")
            out.append({"id": str(d.get("id", i)), "title": str(d.get("title") or ""), "text": d["text"]})
        if not out:
            raise CorpusError("BM25Retriever got an empty document list")
        return out

    def __len__(self) -> int:
        return len(self.docs)

    def _build(self) -> bm25s.BM25:
        model = bm25s.BM25(k1=self.k1, b=self.b)
        model.index([tokenize(_doc_text(d)) for d in self.docs], show_progress=False)
        return model

    def _load(self) -> bm25s.BM25 | None:
        assert self.index_dir is not None
        try:
            manifest = json.loads((self.index_dir / _MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if manifest != self._manifest:
            return None
        try:
            return bm25s.BM25.load(str(self.index_dir), show_progress=False)
        except Exception as e:  # a half-written or foreign index: rebuild instead of failing
            log.warning("ignoring unreadable BM25 index at %s: %s", self.index_dir, e)
            return None

    def _save(self) -> None:
        """Write to a temp dir and rename, so concurrent workers never read a half-written index."""
        assert self.index_dir is not None and self._bm25 is not None
        target = self.index_dir
        tmp: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
            self._bm25.save(str(tmp), show_progress=False)
            (tmp / _MANIFEST).write_text(json.dumps(self._manifest), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except OSError as e:
            log.warning("could not save BM25 index to %s (%s); continuing in memory", target, e)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """Top-``topk`` documents per query, best first; zero-score (no shared term) hits dropped."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        toks = [tokenize(q) if isinstance(q, str) else [] for q in queries]
        results: list[list[Passage]] = [[] for _ in queries]
        live = [i for i, t in enumerate(toks) if t]
        if not live:
            return results
        k = min(topk, len(self.docs))
        with self._lock:
            idx, scores = self._bm25.retrieve([toks[i] for i in live], k=k, show_progress=False, n_threads=0)
        for row, qi in enumerate(live):
            for j, s in zip(idx[row], scores[row], strict=True):
                if float(s) <= 0.0:
                    continue
                d = self.docs[int(j)]
                results[qi].append(Passage(d["id"], d["title"], d["text"], float(s)))
        return results


__all__ = ["DEFAULT_CACHE_DIR", "BM25Retriever", "index_dir_for", "tokenize"]
