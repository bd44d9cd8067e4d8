"""Retrieval-server latency under concurrent kept-alive clients (`treegrpo serve-retriever`).

Starts the real CLI server in a subprocess on 127.0.0.1 (or targets `--url`), on a synthetic corpus
of `--docs` documents, then runs `--clients` threads, each with ONE kept-alive HTTP/1.1 connection,
sending `--requests` top-`--topk` lookups of one query each. Reports p50/p99 latency per request,
errors (any non-200 or exception), throughput, and the p50 of requests on a new connection each.
Run: python benchmarks/retriever_server.py --json [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

WORDS = [f"w{i}" for i in range(3000)]


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` documents of 40 random words; returns queries of 3 words drawn from the documents."""
    rng = random.Random(seed)
    queries = []
    with open(path, "w") as f:
        for i in range(n_docs):
            words = rng.choices(WORDS, k=40)
            f.write(json.dumps({"id": str(i), "title": f"doc {i}", "text": " ".join(words)}) + "\n")
            queries.append(" ".join(rng.sample(words, 3)))
    return queries


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def _client(
    host: str, port: int, path: str, queries: list[str], n: int, topk: int, seed: int, out: dict
) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    lat: list[float] = []
    errors = 0
    for _ in range(n):
        body = json.dumps({"queries": [rng.choice(queries)], "topk": topk, "return_scores": True})
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            ok = resp.status == 200 and len(json.loads(payload)["result"]) == 1
        except (OSError, http.client.HTTPException, ValueError):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
        lat.append((time.perf_counter() - t0) * 1000)
        errors += not ok
    conn.close()
    out[seed] = (lat, errors)


def _new_connection(
    host: str, port: int, path: str, queries: list[str], n: int, topk: int
) -> tuple[float, int]:
    """p50 latency and error count of `n` requests, each on a new connection."""
    lat, errors = [], 0
    for i in range(n):
        body = json.dumps({"queries": [queries[i % len(queries)]], "topk": topk})
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            errors += conn.getresponse().status != 200
        except (OSError, http.client.HTTPException):
            errors += 1
        finally:
            conn.close()
        lat.append((time.perf_counter() - t0) * 1000)
    return _percentile(lat, 0.5), errors


def _start_server(corpus: Path, cache: Path) -> tuple[subprocess.Popen, str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "treegrpo", "serve-retriever", "--corpus", str(corpus), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--cache-dir", str(cache)], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline().decode() if ready else ""
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def run(clients: int, requests: int, docs: int, topk: int, url: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        queries = write_corpus(Path(tmp) / "corpus.jsonl", docs)
        proc = None
        if url is None:
            proc, url = _start_server(Path(tmp) / "corpus.jsonl", Path(tmp) / "cache")
        parts = urlsplit(url)
        host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/retrieve"
        try:
            warm: dict[int, tuple[list[float], int]] = {}
            _client(host, port, path, queries, 20, topk, -1, warm)  # warm-up (and: is it there at all?)
            if warm[-1][1] == 20:
                raise SystemExit(f"no answer from {url}")
            out: dict[int, tuple[list[float], int]] = {}
            threads = [
                threading.Thread(target=_client, args=(host, port, path, queries, requests, topk, i, out))
                for i in range(clients)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
            new_conn, new_conn_errors = _new_connection(host, port, path, queries, 100, topk)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(30)
    lat = [x for ls, _ in out.values() for x in ls]
    return {
        "p50_ms": round(_percentile(lat, 0.5), 3),
        "p99_ms": round(_percentile(lat, 0.99), 3),
        "errors": sum(e for _, e in out.values()),
        "requests": len(lat),
        "clients": clients,
        "requests_per_client": requests,
        "docs": docs,
        "topk": topk,
        "throughput_rps": round(len(lat) / seconds, 1),
        "new_connection_p50_ms": round(new_conn, 3),
        "new_connection_errors": new_conn_errors,
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="16 clients x 50 requests (smoke test)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=500, help="requests per client")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 50)
    for name in ("clients", "requests", "docs", "topk"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1", file=sys.stderr)
            return 2
    result = run(args.clients, args.requests, args.docs, args.topk, args.url)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
