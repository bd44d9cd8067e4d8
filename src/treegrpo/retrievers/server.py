"""Serve any in-process retriever over the Search-R1 retrieval protocol (stdlib HTTP server).

One shared index for many workers, and a real HTTP path for tests. Binds 127.0.0.1 by default:
the server has no authentication, so exposing it is an explicit choice of ``host``.

``POST /retrieve {"queries": [...], "topk": k, "return_scores": true}`` →
``{"result": [[{"document": {"id","title","text","contents"}, "score": s}, ...], ...]}``
(with ``return_scores: false`` each hit is the document itself). ``GET /health`` → ``{"status": "ok"}``.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from treegrpo.retrievers.base import Passage, Retriever

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_TOPK = 1000


def _document(p: Passage) -> dict[str, Any]:
    # Both schemas at once, so Search-R1 clients ("contents") and ours ("title"/"text") can read it.
    return {"id": p.id, "title": p.title, "text": p.text, "contents": p.contents}


class RetrieverHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that owns a retriever. ``server_address`` holds the bound port."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], retriever: Retriever, default_topk: int = 3) -> None:
        self.retriever = retriever
        self.default_topk = default_topk
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/retrieve"


class _Handler(BaseHTTPRequestHandler):
    server: RetrieverHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, code: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": f"no such path {self.path}; use POST /retrieve"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"no such path {self.path}; use POST /retrieve"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._send(400, {"error": "missing or too large Content-Length"})
            return
        try:
            req = json.loads(self.rfile.read(length).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            self._send(400, {"error": f"body is not JSON: {e}"})
            return
        error = _validate(req)
        if error:
            self._send(400, {"error": error})
            return
        queries = req["queries"]
        topk = req.get("topk", self.server.default_topk)
        with_scores = bool(req.get("return_scores", True))
        try:
            hits = self.server.retriever.search(queries, topk)
        except Exception as e:  # the retriever's failure is the client's RetrieverError, not a crash
            log.exception("retriever failed")
            self._send(500, {"error": f"retriever failed: {type(e).__name__}: {e}"})
            return
        if with_scores:
            result = [[{"document": _document(p), "score": p.score} for p in ps] for ps in hits]
        else:
            result = [[_document(p) for p in ps] for ps in hits]
        self._send(200, {"result": result})


def _validate(req: Any) -> str:
    if not isinstance(req, dict):
        return "body must be a JSON object"
    q = req.get("queries")
    if not isinstance(q, list) or not all(isinstance(x, str) for x in q):
        return "'queries' must be a list of strings"
    topk = req.get("topk", 1)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        return f"'topk' must be an int in [1, {MAX_TOPK}]"
    return ""


def make_server(
    retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3
) -> RetrieverHTTPServer:
    """Bind (port 0 = an ephemeral port) without serving yet: run ``serve_forever`` in a thread and
    ``shutdown()`` + ``server_close()`` to stop."""
    return RetrieverHTTPServer((host, port), retriever, default_topk=default_topk)


def serve(retriever: Retriever, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C returns cleanly)."""
    server = make_server(retriever, host, port)
    print(f"treegrpo retriever listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["RetrieverHTTPServer", "make_server", "serve"]
