"""OpenAIPolicy against a local OpenAI-compatible server (127.0.0.1, a thread) that runs a tiny HF model.

The server mimics vLLM's completions API: token-id prompts, `logprobs.tokens` as "token_id:N" with
`return_tokens_as_token_ids`, stop strings with `include_stop_str_in_output`, `seed`. Behind it is an
`HFPolicy` on the same tiny model, so the served path must reproduce the in-process path exactly.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from treegrpo.models import tiny_causal_lm
from treegrpo.policies import HFPolicy
from treegrpo.policies.openai import (
    OpenAIPolicy,
    PolicyServerError,
    api_base,
    parse_token_ids,
    topk_entropy,
)
from treegrpo.protocols import Policy, StepResult
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import ActionKind

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class MimicServer(ThreadingHTTPServer):
    """vLLM-like /v1/models and /v1/completions over an in-process model, with fault switches."""

    daemon_threads = True

    def __init__(self, model: Any, tokenizer: Any, name: str = "tiny") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()
        self.fail_next = 0  # answer this many completion requests with HTTP 500 first
        self.send_ids = True  # honour return_tokens_as_token_ids
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body["prompt"]
        greedy = float(body.get("temperature", 1.0)) == 0.0
        pol = HFPolicy(
            self.model,
            self.tokenizer,
            temperature=1.0 if greedy else float(body["temperature"]),
            top_p=float(body.get("top_p", 1.0)),
            max_new_tokens=int(body["max_tokens"]),
            greedy=greedy,
            stop_strings=tuple(body.get("stop") or ()),
            prefix_cache_tokens=0,
            seed=int(body.get("seed", 0)),
        )
        with self.lock:
            s = pol.generate([ids])[0]
        text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        stop_reason = next((st for st in body.get("stop") or () if st in text), None)
        if stop_reason is not None:  # vLLM cuts the text at the stop string, keeps every token id
            cut = text.index(stop_reason) + (
                len(stop_reason) if body.get("include_stop_str_in_output") else 0
            )
            text = text[:cut]
        as_ids = self.send_ids and body.get("return_tokens_as_token_ids")
        tokens = [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in s.token_ids]
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": {
                        "tokens": tokens,
                        "token_logprobs": s.logprobs,
                        "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, s.logprobs, strict=True)],
                    },
                    "finish_reason": "stop"
                    if stop_reason or len(s.token_ids) < body["max_tokens"]
                    else "length",
                    "stop_reason": stop_reason,
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(s.token_ids)},
        }


class _Handler(BaseHTTPRequestHandler):
    server: MimicServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, payload: Any) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.name, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/v1/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        with self.server.lock:
            fail = self.server.fail_next > 0
            self.server.fail_next -= int(fail)
        if fail:
            self._send(500, {"error": {"message": "engine hiccup"}})
            return
        if len(body["prompt"]) + body["max_tokens"] > 2048:
            self._send(400, {"error": {"message": "maximum context length is 2048 tokens"}})
            return
        self._send(200, self.server.complete(body))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["who founded the company ? search answer the fox jumps over a lazy dog ."])


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=5)


@pytest.fixture
def server(model, tok) -> Iterator[MimicServer]:
    srv = MimicServer(model, tok)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_helpers():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ValueError, match="base url"):
        api_base("h:8000")
    assert parse_token_ids({"logprobs": {"tokens": ["token_id:5", "token_id:0"]}}) == [5, 0]
    assert parse_token_ids({"token_ids": [3, 4], "logprobs": {"tokens": ["a", "b"]}}) == [3, 4]
    assert parse_token_ids({"logprobs": {"tokens": ["token_id:5", "hello"]}}) is None
    assert parse_token_ids({"text": "x"}) is None
    assert topk_entropy([0.0]) == pytest.approx(0.0)
    assert topk_entropy([np.log(0.5), np.log(0.5)]) == pytest.approx(np.log(2))
    # top-1 of a uniform 4-way distribution: 0.25 + lump 0.75 → below the true log 4
    h = topk_entropy([np.log(0.25)])
    assert 0 < h < np.log(4)


def test_served_greedy_equals_in_process(server, model, tok):
    """Same model behind the API: identical token ids, same log-probs, text = decoding of the ids."""
    pol = OpenAIPolicy(server.url, tok, greedy=True, max_new_tokens=12, stop_strings=(), max_context=2048)
    assert isinstance(pol, Policy)
    assert pol.model_name == "tiny"  # picked from /v1/models
    ref = HFPolicy(model, tok, greedy=True, max_new_tokens=12, stop_strings=())
    ctxs = [
        pol.encode_prompt([{"role": "user", "content": "who founded the company ?"}]),
        ids(tok, "the fox"),
    ]
    got, want = pol.generate(ctxs), ref.generate(ctxs)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and len(g.token_ids) == 12
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
        assert g.prefill_tokens > 0 and g.entropies == []
    body = server.requests[-1]
    assert body["return_tokens_as_token_ids"] and body["include_stop_str_in_output"]
    assert body["temperature"] == 0.0 and body["logprobs"] == 1 and body["model"] == "tiny"
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])


def test_sampling_seeded_and_stop_keeps_whole_token(server, tok):
    """Seeds make served sampling reproducible; a stop tag ends the step and stays in the ids."""
    stop = tok.decode(ids(tok, " fox")).strip()  # a word the model will emit sooner or later
    pol = OpenAIPolicy(
        server.url, tok, max_new_tokens=40, stop_strings=(stop,), max_context=2048, entropy_topk=1, seed=3
    )
    ctx = ids(tok, "the lazy dog")
    a = pol.generate([ctx] * 6)
    pol.generator.manual_seed(3)
    b = pol.generate([ctx] * 6)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert len({tuple(s.token_ids) for s in a}) > 1  # distinct per-row seeds
    stopped = [s for s in a if stop in s.text]
    assert stopped and server.requests[-1]["stop"] == [stop]
    for s in stopped:
        assert s.text.rstrip().endswith(stop)  # nothing generated after the stop tag
    assert all(len(s.entropies) == len(s.token_ids) for s in a)  # top-1 entropy lower bound


def test_tree_rollout_through_server(server, tok):
    """A full Tree-GRPO (2,2,1) rollout samples through the API with a search-style environment."""

    class Env:
        def start(self, row):
            return (row["q"], 0), [{"role": "user", "content": row["q"]}]

        def step(self, states, actions):
            return [
                StepResult(
                    state=(q, n + 1),
                    observation=" the fox ." if n + 1 < 3 else "",
                    done=n + 1 >= 3,
                    action=ActionKind.SEARCH if n + 1 < 3 else ActionKind.ANSWER,
                    tool_calls=int(n + 1 < 3),
                )
                for (q, n), _ in zip(states, actions, strict=True)
            ]

        def reward(self, state):
            return float(state[1] == 3)

    pol = OpenAIPolicy(server.url, tok, max_new_tokens=5, max_context=2048, seed=1)
    rows = [{"q": "who founded the company ?"}, {"q": "the fox jumps"}]
    cfg = RolloutConfig(strategy="random", m=2, n=2, l=1)
    res = sample_forests(rows, ["a", "b"], pol, Env(), cfg, np.random.default_rng(0))
    for f in res.forests:
        assert sum(len(t.leaves()) for t in f.trees) == 6
        for t in f.trees:
            for n in t.nodes[1:]:
                assert len(n.token_ids) == len(n.logprobs) > 0
    assert res.budget["trajectories"] == 12
    assert pol.stats["generated_tokens"] == res.budget["generated_tokens"]
    # no cached_tokens in this server's usage: every context token counts as prefilled
    assert res.budget["prefill_tokens_reported"] == res.budget["prefill_tokens_no_reuse"]


def test_retry_then_ok(server, tok):
    pol = OpenAIPolicy(server.url, tok, greedy=True, max_new_tokens=3, max_context=2048, sleep=lambda s: None)
    server.fail_next = 1
    out = pol.generate([ids(tok, "the fox")])
    assert len(out[0].token_ids) == 3
    assert pol.stats["retries"] == 1 and server.fail_next == 0


def test_persistent_5xx_and_4xx_errors(server, tok):
    slept: list[float] = []
    pol = OpenAIPolicy(
        server.url, tok, greedy=True, max_new_tokens=3, max_retries=2, backoff=0.1, sleep=slept.append
    )
    server.fail_next = 10
    with pytest.raises(PolicyServerError, match=r"failed after 3 attempt\(s\): HTTP 500: engine hiccup"):
        pol.generate([ids(tok, "the fox")])
    assert slept == [0.1, 0.2]
    server.fail_next = 0
    n = len(server.requests)
    with pytest.raises(PolicyServerError, match="after 1 attempt.*maximum context length"):
        pol.generate([[ids(tok, "the")[0]] * 2100])  # the server's limit is lower than ours: not retried
    assert len(server.requests) == n + 1


def test_dead_server_is_a_clear_error(tok):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.server_close()  # nothing listens on this port now
    t0 = time.perf_counter()
    with pytest.raises(PolicyServerError, match=rf"{url}/v1/models failed after 2 attempt\(s\).*Connection"):
        OpenAIPolicy(url, tok, max_retries=1, backoff=0.01, timeout=2)
    assert time.perf_counter() - t0 < 5


def test_unknown_served_model_and_ids_fallback_warns(server, tok):
    with pytest.raises(PolicyServerError, match="policy.api_model: 'other' is not served.*tiny"):
        OpenAIPolicy(server.url, tok, model="other")
    server.send_ids = False
    pol = OpenAIPolicy(server.url, tok, greedy=True, max_new_tokens=6, stop_strings=(), max_context=2048)
    with pytest.warns(RuntimeWarning, match="re-tokenizing its text.*breaks token-in/token-out"):
        s = pol.generate([ids(tok, "the fox")])[0]
    assert s.token_ids == ids(tok, s.text) and len(s.logprobs) == len(s.token_ids)


def test_context_limits_and_bad_ids(server, tok):
    pol = OpenAIPolicy(server.url, tok, greedy=True, max_new_tokens=8, max_context=6)
    n = len(server.requests)
    out = pol.generate([ids(tok, "the fox jumps over a lazy dog"), ids(tok, "the fox")])
    assert out[0].token_ids == [] and len(server.requests) == n + 1  # full context: no request sent
    assert server.requests[-1]["max_tokens"] == 6 - len(ids(tok, "the fox"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pol.generate([[len(tok) + 5]])


def test_eval_cli_through_server_matches_hf(tiny_config, capsys):
    """`treegrpo eval --backend openai --base-url …` on the tiny run == the in-process HF evaluation."""
    from treegrpo.build import build_run
    from treegrpo.cli import main
    from treegrpo.commands import evaluate_cli
    from treegrpo.config import load_config

    cfg = load_config(tiny_config)
    hf = evaluate_cli(cfg)
    parts = build_run(cfg, log=lambda s: None)  # cached warm start: the same weights the CLI loads
    srv = MimicServer(parts.model, parts.tokenizer, name="tiny-agent")
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        capsys.readouterr()
        rc = main(
            ["eval", "--config", str(tiny_config), "--backend", "openai", "--base-url", srv.url + "/v1"]
        )
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "tiny-agent served at" in out
        got = {
            k: float(v)
            for k, v in (line.split(": ") for line in out.splitlines() if line.startswith("eval/"))
        }
        assert got == pytest.approx(hf, abs=1e-4)
        assert len(srv.requests) >= cfg.data.eval_size
    finally:
        srv.shutdown()
        srv.server_close()
    # a dead server: one line, exit 2
    dead = ["eval", "--config", str(tiny_config), "--backend", "openai", "--base-url", srv.url]
    rc = main([*dead, "--set", "policy.max_retries=0"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: transformers' loading bar)
    assert rc == 2 and last.startswith("error: generation server http://127.0.0.1:")
    assert "Connection refused" in last
    # training through servers needs their address: one line, exit 2
    rc = main(["train", "--config", str(tiny_config), "--set", "policy.backend=openai", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2 and err[-1] == "error: policy.base_url: required when policy.backend is 'openai' (--base-url)"
    )


def test_env_stop_strings_are_sent_to_the_server(server, tok):
    """A plug-in env's `stop_strings` reach the server request and end the served step."""
    stop = tok.decode(ids(tok, " fox")).strip()

    class Env:
        stop_strings = (stop, "</calc>")

        def start(self, row):
            return 0, [{"role": "user", "content": row["q"]}]

        def step(self, states, actions):
            return [StepResult(1, "", True, ActionKind.ANSWER) for _ in states]

        def reward(self, state):
            return 0.0

    pol = OpenAIPolicy(server.url, tok, max_new_tokens=40, max_context=2048, seed=3)
    cfg = RolloutConfig(strategy="chain", num_generations=6)
    res = sample_forests([{"q": "the lazy dog"}], ["a"], pol, Env(), cfg, np.random.default_rng(0))
    assert server.requests[-1]["stop"] == [stop, "</calc>"]
    texts = [t.nodes[1].text for t in res.forests[0].trees]
    stopped = [x for x in texts if stop in x]
    assert stopped and all(x.rstrip().endswith(stop) for x in stopped)
