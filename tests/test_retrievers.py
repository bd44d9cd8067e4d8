"""Corpus loading, BM25 (in process and persisted), and the HTTP server/client round trip."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from treegrpo.retrievers import (
    BM25Retriever,
    CorpusError,
    HTTPRetriever,
    Passage,
    Retriever,
    RetrieverError,
    load_corpus,
    make_server,
)
from treegrpo.retrievers.bm25 import index_dir_for

DOCS = [
    {
        "id": "d1",
        "title": "Ada Lovelace",
        "text": "Ada Lovelace wrote the first published algorithm for a machine.",
    },
    {
        "id": "d2",
        "title": "Alan Turing",
        "text": "Alan Turing proposed the imitation game and broke Enigma ciphers.",
    },
    {
        "id": "d3",
        "title": "Grace Hopper",
        "text": "Grace Hopper built the first compiler and popularised COBOL.",
    },
    {
        "id": "d4",
        "title": "Claude Shannon",
        "text": "Claude Shannon founded information theory at Bell Labs.",
    },
    {
        "id": "d5",
        "title": "Edsger Dijkstra",
        "text": "Dijkstra published a shortest path algorithm for graphs.",
    },
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- corpus --------------------------------------------------------------------------------
def test_load_corpus_both_schemas(tmp_path):
    ours = _write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    assert load_corpus(ours) == DOCS[:2]
    sr1 = tmp_path / "b.jsonl"
    sr1.write_text(
        json.dumps({"id": "7", "contents": '"Ada Lovelace"\nAda wrote notes.\nMore.'})
        + "\n\n"
        + json.dumps({"contents": "Plain title\nbody"})
        + "\n",
        encoding="utf-8",
    )
    docs = load_corpus(sr1)
    assert docs[0] == {"id": "7", "title": "Ada Lovelace", "text": "Ada wrote notes.\nMore."}
    assert docs[1] == {"id": "1", "title": "Plain title", "text": "body"}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"id": 1, "text": "ok"}\n{broken\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"id": 1, "text": "ok"}\n{"id": 2}\n', r"bad\.jsonl:2: .*neither 'text' nor 'contents'"),
        ("[1, 2]\n", r"bad\.jsonl:1: document must be an object"),
        ('{"id": 1, "text": 5}\n', r"bad\.jsonl:1: .*must be strings"),
        ("\n\n", r"has no documents"),
    ],
)
def test_load_corpus_errors_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=match):
        load_corpus(p)


def test_load_corpus_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="cannot read corpus"):
        load_corpus(tmp_path / "nope.jsonl")


# ---- BM25 ----------------------------------------------------------------------------------
def test_bm25_finds_the_right_document():
    r = BM25Retriever(docs=DOCS)
    assert isinstance(r, Retriever)
    queries = [
        "who built the first compiler",
        "imitation game Enigma",
        "founder of information theory",
        "shortest path graphs",
        "first published algorithm machine",
    ]
    hits = r.search(queries, topk=2)
    assert [h[0].id for h in hits] == ["d3", "d2", "d4", "d5", "d1"]
    for h in hits:
        assert all(isinstance(p, Passage) for p in h)
        assert [p.score for p in h] == sorted((p.score for p in h), reverse=True)
    # topk above the corpus size, a query of stopwords only, a query with unknown words only.
    assert len(r.search(["algorithm"], topk=50)[0]) == 2  # only docs sharing a term
    assert r.search(["the of and", "zzzz qqqq", ""], topk=3) == [[], [], []]
    assert r.search([], topk=3) == []
    with pytest.raises(ValueError, match="topk"):
        r.search(["x"], topk=0)


def test_bm25_index_saved_in_the_cache_dir_and_reloaded(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    corpus = _write_jsonl(data / "kb.jsonl", DOCS)
    cache = tmp_path / "cache"
    first = BM25Retriever(corpus_path=corpus, cache_dir=cache)
    index_dir = index_dir_for(corpus, cache)
    assert index_dir.parent == cache / "bm25" and index_dir.name.startswith("kb.jsonl-")
    assert index_dir.is_dir() and not first.loaded_from_disk
    assert sorted(p.name for p in data.iterdir()) == ["kb.jsonl"]  # nothing written next to the corpus
    second = BM25Retriever(corpus_path=corpus, cache_dir=cache)
    assert second.loaded_from_disk
    q = ["Bell Labs information", "COBOL compiler"]
    assert second.search(q, 3) == first.search(q, 3)
    # Changing the corpus makes the saved index stale: it is rebuilt, and finds the new doc.
    time.sleep(0.01)
    _write_jsonl(
        corpus, [*DOCS, {"id": "d6", "title": "Barbara Liskov", "text": "Liskov substitution principle."}]
    )
    third = BM25Retriever(corpus_path=corpus, cache_dir=cache)
    assert not third.loaded_from_disk
    assert third.search(["substitution principle"], 1)[0][0].id == "d6"


def test_bm25_unwritable_index_dir_still_works(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = BM25Retriever(docs=DOCS, index_dir=blocker / "idx")  # parent is a file: save fails quietly
    assert r.search(["compiler"], 1)[0][0].id == "d3"


def test_bm25_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        BM25Retriever()
    with pytest.raises(CorpusError, match="empty"):
        BM25Retriever(docs=[])
    with pytest.raises(CorpusError, match=r"docs\[1\]"):
        BM25Retriever(docs=[{"text": "a"}, {"title": "no text"}])


# ---- HTTP ----------------------------------------------------------------------------------
@pytest.fixture
def served() -> Iterator[tuple[BM25Retriever, str]]:
    r = BM25Retriever(docs=DOCS)
    server = make_server(r, port=0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield r, server.url
    finally:
        server.shutdown()
        server.server_close()


def test_http_round_trip_equals_in_process(served):
    local, url = served
    queries = ["first compiler", "Enigma", "nothing matches zzz", "algorithm"]
    remote = HTTPRetriever(url, timeout=5)
    assert remote.search(queries, 3) == local.search(queries, 3)
    base = HTTPRetriever(url.removesuffix("/retrieve"))  # base URL gets /retrieve appended
    assert base.search(queries, 1) == local.search(queries, 1)


def test_server_speaks_search_r1_protocol(served):
    import urllib.request

    _, url = served
    body = json.dumps({"queries": ["first compiler"], "topk": 1, "return_scores": True}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        payload = json.loads(resp.read())
    hit = payload["result"][0][0]
    assert hit["document"]["contents"].startswith("Grace Hopper\n")
    assert hit["score"] > 0
    body = json.dumps({"queries": ["first compiler"], "topk": 1, "return_scores": False}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as resp:
        assert json.loads(resp.read())["result"][0][0]["id"] == "d3"
    bad = urllib.request.Request(url, data=b'{"queries": "not a list"}')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=5)
    assert e.value.code == 400


class _Fake(BaseHTTPRequestHandler):
    """A misbehaving server: mode is set on the server object."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.server.hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.server.mode
        if mode == "slow":
            time.sleep(0.5)
        if mode == "500" or (mode == "flaky" and self.server.hits == 1):
            body, code = b'{"error": "boom"}', 500
        elif mode == "garbage":
            body, code = b"<html>not json", 200
        elif mode == "wrong-shape":
            body, code = b'{"result": []}', 200
        elif mode == "400":
            body, code = b'{"error": "bad"}', 400
        else:
            doc = {"document": {"id": "x", "contents": '"T"\nbody'}, "score": 1.5}
            body, code = json.dumps({"result": [[doc]]}).encode(), 200
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client already timed out


@pytest.fixture
def fake() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    server.daemon_threads = True
    server.hits = 0
    server.mode = "ok"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _client(server, **kw) -> HTTPRetriever:
    host, port = server.server_address[:2]
    sleeps: list[float] = []
    c = HTTPRetriever(f"http://{host}:{port}/retrieve", sleep=sleeps.append, **kw)
    c.sleeps = sleeps
    return c


@pytest.mark.parametrize("mode", ["500", "garbage", "wrong-shape"])
def test_client_retries_then_raises(fake, mode):
    fake.mode = mode
    c = _client(fake, max_retries=2, backoff=0.1, timeout=2)
    with pytest.raises(RetrieverError, match="after 3 attempt"):
        c.search(["q"], 1)
    assert fake.hits == 3
    assert c.sleeps == [0.1, 0.2]  # exponential backoff


def test_client_does_not_retry_client_errors(fake):
    fake.mode = "400"
    with pytest.raises(RetrieverError, match="HTTP 400"):
        _client(fake, max_retries=3).search(["q"], 1)
    assert fake.hits == 1


def test_client_recovers_from_a_transient_failure(fake):
    fake.mode = "flaky"
    hits = _client(fake, max_retries=1, backoff=0).search(["q"], 1)
    assert hits == [[Passage("x", "T", "body", 1.5)]]


def test_client_timeout_and_dead_server(fake):
    fake.mode = "slow"
    with pytest.raises(RetrieverError, match="after 1 attempt"):
        _client(fake, max_retries=0, timeout=0.1).search(["q"], 1)
    host, port = fake.server_address[:2]
    fake.shutdown()
    fake.server_close()
    dead = HTTPRetriever(f"http://{host}:{port}", max_retries=1, backoff=0, timeout=1)
    with pytest.raises(RetrieverError, match="after 2 attempt"):
        dead.search(["q"], 1)


def test_client_bad_arguments():
    with pytest.raises(ValueError, match="url"):
        HTTPRetriever("localhost:8000")
    with pytest.raises(ValueError, match="timeout"):
        HTTPRetriever("http://127.0.0.1:1", timeout=0)
