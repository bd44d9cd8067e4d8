"""Serve any in-process retriever over the Search-R1 retrieval protocol (a Starlette app on uvicorn).

One shared index for many rollout workers. ``POST /retrieve {"queries": [...], "topk": k,
"return_scores": true}`` → ``{"result": [[{"document": {"id","title","text","contents"}, "score": s},
...], ...]}`` (with ``return_scores: false`` each hit is the document itself); ``GET /health`` →
``{"status": "ok"}``.

Hardening, because a shared server must survive its clients: the body size, the number of queries,
``topk`` and the total number of hits per request are bounded (413 / 400 with a JSON ``error``); a body
that arrives slower than ``body_timeout`` (e.g. shorter than its Content-Length) gets 408 instead of
holding a connection, and a connection idle for ``idle_timeout`` (before its first request, too) is
closed; large requests are searched in worker threads so they do not stall small ones
(a lookup of a few queries, ~0.2 ms of BM25, is answered on the event loop: the thread hop costs more);
the socket is bound (so a busy port is a one-line error) before anything says "serving"; the listen
backlog is 2048; asyncio sets TCP_NODELAY on every connection, so kept-alive clients do not wait on
Nagle + delayed ACK. Binds 127.0.0.1 by default: there is no authentication, so exposing it is an
explicit choice of ``host``.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from treegrpo.errors import UserError
from treegrpo.retrievers.base import Passage, Retriever

log = logging.getLogger(__name__)

BACKLOG = 2048
INLINE_BODY_BYTES = 4096  # bodies up to this size are answered on the event loop (about 0.2 ms of BM25)


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds. The defaults admit a whole rollout wave (thousands of queries) at once."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_queries: int = 4096
    max_topk: int = 100
    max_hits: int = 50_000  # queries x topk: bounds the reply (and the memory to build it)
    body_timeout: float = 10.0  # seconds to receive the whole body


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _document(p: Passage) -> dict[str, Any]:
    # Both schemas at once, so Search-R1 clients ("contents") and ours ("title"/"text") can read it.
    return {"id": p.id, "title": p.title, "text": p.text, "contents": p.contents}


def _json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def parse_request(body: bytes, limits: ServerLimits, default_topk: int) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) of a /retrieve body, or _Reject(400/413) saying what is wrong."""
    try:
        req = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _Reject(400, f"body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise _Reject(400, "body must be a JSON object")
    queries = req.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise _Reject(400, "'queries' must be a list of strings")
    topk = req.get("topk", default_topk)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limits.max_topk:
        raise _Reject(400, f"'topk' must be an int in [1, {limits.max_topk}]")
    if len(queries) > limits.max_queries:
        raise _Reject(413, f"{len(queries)} queries in one request; the limit is {limits.max_queries}")
    if len(queries) * topk > limits.max_hits:
        raise _Reject(413, f"{len(queries)} queries x topk {topk} is over the {limits.max_hits}-hit limit")
    return queries, topk, bool(req.get("return_scores", True))


def answer(
    retriever: Retriever, body: bytes, limits: ServerLimits, default_topk: int = 3
) -> tuple[int, bytes]:
    """One /retrieve request, start to finish (blocking): (HTTP status, JSON body)."""
    try:
        queries, topk, with_scores = parse_request(body, limits, default_topk)
    except _Reject as e:
        return e.status, _json({"error": str(e)})
    try:
        hits = retriever.search(queries, topk)
    except Exception as e:  # noqa: BLE001 - the retriever's failure is the client's RetrieverError, not a crash
        log.warning("retriever failed: %s: %s", type(e).__name__, e)
        return 500, _json({"error": f"retriever failed: {type(e).__name__}: {e}"})
    if with_scores:
        result = [[{"document": _document(p), "score": p.score} for p in ps] for ps in hits]
    else:
        result = [[_document(p) for p in ps] for ps in hits]
    return 200, _json({"result": result})


async def _read_body(request: Request, limits: ServerLimits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _Reject(413, f"body of {declared} bytes is over the {limits.max_body_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(limits.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:  # chunked bodies have no Content-Length to check first
                    raise _Reject(413, f"body is over the {limits.max_body_bytes}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise _Reject(408, f"body not received within {limits.body_timeout:g} s") from None
    return b"".join(chunks)


def make_app(retriever: Retriever, limits: ServerLimits | None = None, default_topk: int = 3) -> Starlette:
    """The ASGI app: POST /retrieve and GET /health (mount it in any ASGI server)."""
    limits = limits or ServerLimits()

    async def retrieve(request: Request) -> Response:
        try:
            body = await _read_body(request, limits)
        except _Reject as e:
            # Connection: close, so the unread rest of the body is not parsed as the next request.
            return JSONResponse({"error": str(e)}, status_code=e.status, headers={"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        if len(body) <= INLINE_BODY_BYTES:  # a lookup or two: cheaper than the hop to a worker thread
            status, payload = answer(retriever, body, limits, default_topk)
        else:  # a large batch must not stall the event loop (and the small requests behind it)
            status, payload = await run_in_threadpool(answer, retriever, body, limits, default_topk)
        return Response(payload, status_code=status, media_type="application/json")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            {"error": f"no such path {request.url.path}; use POST /retrieve"}, status_code=404
        )

    async def bad_method(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"{request.method} not allowed; use POST /retrieve"}, status_code=405)

    return Starlette(
        routes=[Route("/retrieve", retrieve, methods=["POST"]), Route("/health", health, methods=["GET"])],
        exception_handlers={404: not_found, 405: bad_method},
    )


def bind_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket, or UserError in one line (busy port, bad address, no permission)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: cannot resolve ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, never a live listener
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"--port {port}: {host}:{port} is already in use (another server?); pick another port"
            ) from None
        raise UserError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def _idle_guarded_protocol() -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) that also closes a connection which
    sends nothing at all within the keep-alive timeout: uvicorn starts that timer only after a response,
    so a client that connects and stays silent would hold its connection (and a concurrency slot) forever."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools missing
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class IdleGuardedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if getattr(self, "timeout_keep_alive_task", "absent") is None:  # the attribute this relies on
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    return IdleGuardedProtocol


class RetrieverServer:
    """An ASGI app served by uvicorn on an already-bound socket.

    ``serve_forever()`` blocks (run it in a thread for tests); ``shutdown()`` stops it and waits;
    ``server_close()`` releases the socket. ``server_address`` and ``url`` hold the bound port.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        host: str = "127.0.0.1",
        port: int = 8000,
        sock: socket.socket | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        import uvicorn

        self.socket = sock if sock is not None else bind_socket(host, port)
        self.server_address: tuple[str, int] = tuple(self.socket.getsockname()[:2])  # type: ignore[assignment]
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            backlog=BACKLOG,
            http=_idle_guarded_protocol(),
            # Idle seconds before a connection is closed, before its first request too; rollout workers
            # keep theirs between waves.
            timeout_keep_alive=idle_timeout,
            limit_concurrency=4096,
        )
        self._server = uvicorn.Server(config)
        self._running = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/retrieve"

    def serve_forever(self) -> None:
        self._running.set()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self) -> RetrieverServer:
        """Serve in a daemon thread; returns once uvicorn accepts connections."""
        threading.Thread(target=self.serve_forever, daemon=True, name="treegrpo-retriever").start()
        while not self._server.started and not self._stopped.is_set():
            self._stopped.wait(0.01)
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._running.is_set():
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    retriever: Retriever,
    host: str = "127.0.0.1",
    port: int = 8000,
    default_topk: int = 3,
    limits: ServerLimits | None = None,
    sock: socket.socket | None = None,
) -> RetrieverServer:
    """Bind (port 0 = an ephemeral port; or use `sock`) without serving yet: ``serve_forever`` in a thread
    (or ``start()``), then ``shutdown()`` + ``server_close()`` to stop."""
    return RetrieverServer(make_app(retriever, limits, default_topk), host, port, sock=sock)


def serve(
    retriever: Retriever,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    label: str = "retriever",
    sock: socket.socket | None = None,
) -> None:
    """Bind (unless `sock` is bound already), say so in one line, serve until Ctrl-C."""
    server = make_server(retriever, host, port, limits=limits, sock=sock)
    print(f"serving {label} on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the normal way to stop
        pass
    finally:
        server.server_close()


__all__ = [
    "BACKLOG",
    "RetrieverServer",
    "ServerLimits",
    "answer",
    "bind_socket",
    "make_app",
    "make_server",
    "serve",
]
