"""The retrieval server under abuse, over real HTTP on 127.0.0.1.

Oversize bodies and requests get 413 while concurrent small requests are served; malformed JSON and bad
`topk` get 400; a body shorter than its Content-Length gets 408 after `--body-timeout` (no hang, no
traceback); a busy port is one line and exit 2 before anything says "serving"; the BM25 index goes to
`--cache-dir`, never next to the corpus.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from treegrpo.cli import main
from treegrpo.retrievers import BM25Retriever, HTTPRetriever, RetrieverError
from treegrpo.retrievers.server import RetrieverServer, ServerLimits, make_app, make_server

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {
        "id": f"d{i}",
        "title": f"Entity {i}",
        "text": f"entity {i} lives in city {i % 7} and works at firm {i % 5}",
    }
    for i in range(50)
]


def _post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", "/retrieve", body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _read_response(s: socket.socket) -> tuple[int, bytes]:
    resp = http.client.HTTPResponse(s)
    resp.begin()
    return resp.status, resp.read()


def _small(port: int) -> tuple[int, dict]:
    return _post(port, json.dumps({"queries": ["entity 3 city"], "topk": 3}).encode())


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A server on an ephemeral port; `@pytest.mark.parametrize("server", [seconds], indirect=True)`
    sets its body timeout (default 30 s, so a slow machine never turns a 413 into a 408)."""
    timeout = getattr(request, "param", 30.0)
    srv = make_server(BM25Retriever(docs=DOCS), port=0, limits=ServerLimits(body_timeout=timeout)).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_protocol_keep_alive_and_errors(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    for _ in range(3):  # one kept-alive connection, several requests
        conn.request("POST", "/retrieve", body=json.dumps({"queries": ["entity 3", "firm 2"], "topk": 2}))
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 200 and [len(r) for r in payload["result"]] == [2, 2]
        assert payload["result"][0][0]["document"]["title"] == "Entity 3"
    conn.close()
    assert HTTPRetriever(f"http://127.0.0.1:{server}").search(["entity 7"], 1)[0][0].id == "d7"
    for body, code, says in [
        (b"{not json", 400, "not JSON"),
        (b"\xff\xfe", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"queries": "x"}).encode(), 400, "list of strings"),
        (json.dumps({"queries": ["x"], "topk": 101}).encode(), 400, "[1, 100]"),
        (json.dumps({"queries": ["x"], "topk": 0}).encode(), 400, "[1, 100]"),
        (json.dumps({"queries": ["x"] * 4097}).encode(), 413, "4097 queries"),
        (json.dumps({"queries": ["x"] * 1000, "topk": 100}).encode(), 413, "50000-hit limit"),
    ]:
        status, payload = _post(server, body)
        assert (status, says in payload["error"]) == (code, True), (body[:40], status, payload)
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    c.request("GET", "/health")
    assert json.loads(c.getresponse().read()) == {"status": "ok"}
    c.request("GET", "/retrieve")
    assert c.getresponse().status == 405
    c.close()


def test_oversize_gets_413_while_a_concurrent_small_request_is_served(server: int) -> None:
    # The abuse: 200k queries (3.2 MB). Its body is sent slowly, so it is in flight for a while.
    big = json.dumps({"queries": [f"q{i}" for i in range(200_000)], "topk": 3}).encode()
    result: dict[str, object] = {}

    def send_big() -> None:
        with socket.create_connection(("127.0.0.1", server), timeout=30) as s:
            s.sendall(f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n".encode())
            for i in range(0, len(big), len(big) // 20):
                s.sendall(big[i : i + len(big) // 20])
                time.sleep(0.02)
            result["big_sent"] = time.monotonic()
            result["reply"] = _read_response(s)

    t = threading.Thread(target=send_big)
    t.start()
    served_during = 0
    while t.is_alive() and "big_sent" not in result:
        status, payload = _small(server)
        assert status == 200 and payload["result"][0][0]["document"]["id"] == "d3"
        served_during += "big_sent" not in result
    t.join(30)
    assert served_during >= 3, served_during  # small requests were answered while the big one arrived
    status, body = result["reply"]  # type: ignore[misc]
    assert status == 413, (status, body)
    assert b"200000 queries in one request; the limit is 4096" in body and len(body) < 200
    # a body over the byte limit is refused from its Content-Length, before it is read
    status, payload = _post(server, b"x" * 16, headers={"Content-Length": str(9 * 1024 * 1024)})
    assert status == 413 and "byte limit" in payload["error"]
    # ... and a chunked one (no Content-Length) when it crosses the limit
    chunks = (b"x" * 65536 for _ in range(140))  # 9 MB
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    try:
        conn.request("POST", "/retrieve", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "byte limit" in json.loads(resp.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the client was still sending: also a refusal
    finally:
        conn.close()
    assert _small(server)[0] == 200


@pytest.mark.parametrize("server", [0.5], indirect=True)
def test_short_body_times_out_with_408_and_does_not_block_others(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b'POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"queries": ')
        assert _small(server)[0] == 200  # served while the short body waits
        status, body = _read_response(s)
        assert status == 408 and b"body not received within 0.5 s" in body, (status, body)
        assert s.recv(65536) == b""  # and the connection is closed
    assert _small(server)[0] == 200


# ---- the CLI: bind first, one line on a busy port, cache dir, no tracebacks --------------------------
def _write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


def test_busy_port_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    corpus = _write_corpus(tmp_path / "c.jsonl")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve-retriever", "--corpus", str(corpus), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"--port {port}: 127.0.0.1:{port} is already in use" in lines[0], err
    assert "serving" not in out and "Traceback" not in err
    for bad in (["--max-queries", "0"], ["--port", "70000"]):
        assert main(["serve-retriever", "--corpus", str(corpus), *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_served_from_the_cli_with_the_index_in_the_cache_dir(tmp_path: Path) -> None:
    data = tmp_path / "readonly-data"
    data.mkdir()
    corpus = _write_corpus(data / "corpus.jsonl")
    data.chmod(0o555)  # the corpus directory may be read-only or shared
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "treegrpo", "serve-retriever", "--corpus", str(corpus), "--port", "0"]
    cmd += ["--cache-dir", str(cache), "--body-timeout", "0.5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no 'serving' line within 60 s"
        line = proc.stdout.readline().decode()
        assert line.startswith(f"serving {corpus} on http://127.0.0.1:") and line.rstrip().endswith(
            "(Ctrl-C to stop)"
        )
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        assert _small(port)[0] == 200  # bound before the line was printed: no connection refused
        # abuse that used to print tracebacks: a short body, then the client goes away mid-body
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            assert _read_response(s)[0] == 408
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            s.recv(65536)
        assert _small(port)[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        data.chmod(0o755)
    assert "Traceback" not in err.decode(), err.decode()
    assert sorted(p.name for p in data.iterdir()) == ["corpus.jsonl"]
    assert [p.name.split("-")[0] for p in (cache / "bm25").iterdir()] == ["corpus.jsonl"]


def test_benchmark_script_prints_the_keys() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "benchmarks" / "retriever_server.py"
    args = ["--json", "--quick", "--clients", "4", "--requests", "10", "--docs", "200"]
    r = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert {"p50_ms", "p99_ms", "errors", "requests"} <= set(out)
    assert out["errors"] == 0 and out["requests"] == 40 and out["p50_ms"] <= out["p99_ms"]


def test_client_splits_a_large_wave_into_requests_the_server_accepts() -> None:
    local = BM25Retriever(docs=DOCS)
    srv = make_server(local, port=0, limits=ServerLimits(max_queries=4)).start()
    try:
        queries = [f"entity {i} firm" for i in range(10)]
        url = srv.url
        with pytest.raises(RetrieverError, match="HTTP 413"):
            HTTPRetriever(url, max_batch=10, max_retries=0).search(queries, 2)
        assert HTTPRetriever(url, max_batch=4).search(queries, 2) == local.search(queries, 2)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_silent_connection_is_closed_after_the_idle_timeout() -> None:
    srv = RetrieverServer(make_app(BM25Retriever(docs=DOCS)), port=0, idle_timeout=0.5).start()
    try:
        port = srv.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # connects, never sends
            assert s.recv(1) == b""  # closed by the server (a hang would hit the 10 s socket timeout)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # after a response, too
            body = json.dumps({"queries": ["entity 3"], "topk": 1}).encode()
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert _read_response(s)[0] == 200
            assert s.recv(1) == b""
        assert _small(port)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
