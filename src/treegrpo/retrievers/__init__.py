"""Retrievers: batched search over a corpus, in process (BM25) or over HTTP (Search-R1 protocol)."""

from treegrpo.retrievers.base import (
    CorpusError,
    Passage,
    Retriever,
    RetrieverError,
    document_to_passage,
    load_corpus,
    split_contents,
)
from treegrpo.retrievers.bm25 import BM25Retriever
from treegrpo.retrievers.http import HTTPRetriever
from treegrpo.retrievers.server import make_server, serve

__all__ = [
    "BM25Retriever",
    "CorpusError",
    "HTTPRetriever",
    "Passage",
    "Retriever",
    "RetrieverError",
    "document_to_passage",
    "load_corpus",
    "make_server",
    "serve",
    "split_contents",
]
