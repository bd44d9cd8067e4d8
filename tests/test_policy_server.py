"""`treegrpo serve-policy` over real HTTP on 127.0.0.1: the served path must equal the in-process HFPolicy.

A tiny Llama built from a config sits behind the starlette/uvicorn server on a thread of this process; the
client is the project's own `OpenAIPolicy` (what evaluation and training rollouts use) or raw urllib.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from treegrpo.models import tiny_causal_lm
from treegrpo.policies import HFPolicy
from treegrpo.policies.openai import OpenAIPolicy, PolicyServerError
from treegrpo.policy_engine import PolicyEngine
from treegrpo.policy_server import BackgroundServer, ServerLimits
from treegrpo.tokenizer import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["who founded the company ? search answer the fox jumps over a lazy dog ."])


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=5)


@pytest.fixture
def server(model, tok):
    engine = PolicyEngine(copy.deepcopy(model), tok, name="tiny")
    with BackgroundServer(
        engine, ServerLimits(max_body_bytes=64 * 1024, max_prompts=8, max_tokens=64)
    ) as srv:
        yield srv


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_greedy_and_logprobs_equal_in_process(server, model, tok):
    pol = OpenAIPolicy(server.url, tok, greedy=True, max_new_tokens=12, stop_strings=(), max_context=2048)
    assert pol.model_name == "tiny"
    ref = HFPolicy(model, tok, greedy=True, max_new_tokens=12, stop_strings=())
    ctxs = [ids(tok, "who founded the company ?"), ids(tok, "the fox")]
    got, want = pol.generate(ctxs), ref.generate(ctxs)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and len(g.token_ids) == 12
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
    # sampled (temperature 0.7): the log-probs are of softmax(logits / T), like HFPolicy's, to rounding
    code, reply = post(
        server.url + "/v1/completions",
        {"prompt": ctxs[0], "max_tokens": 8, "temperature": 0.7, "seed": 4, "logprobs": 1},
    )
    assert code == 200
    choice = reply["choices"][0]
    hf = HFPolicy(model, tok, temperature=0.7, max_new_tokens=8, stop_strings=(), prefix_cache_tokens=0)
    hf.generator.manual_seed(4)
    s = hf.generate([ctxs[0]])[0]
    assert choice["token_ids"] == s.token_ids
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(s.logprobs, abs=1e-5)
    assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in s.token_ids]
    assert reply["usage"]["prompt_tokens"] == len(ctxs[0]) and reply["treegrpo_version"] == 0


def test_list_of_prompts_n_and_token_id_strings(server, tok):
    p1, p2 = ids(tok, "the fox"), ids(tok, "a lazy dog")
    code, reply = post(
        server.url + "/v1/completions",
        {
            "prompt": [p1, p2],
            "n": 2,
            "max_tokens": 5,
            "seed": 1,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        },
    )
    assert code == 200 and [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    for c in reply["choices"]:
        assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]
        assert 1 <= len(c["token_ids"]) == len(c["logprobs"]["token_logprobs"]) <= 5
    assert reply["usage"]["prompt_tokens"] == 2 * (len(p1) + len(p2))
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # one batch: nothing cached yet
    # the same prompts again: the prefix cache holds their KV, only the last prompt token is recomputed
    reply = post(server.url + "/v1/completions", {"prompt": [p1, p2], "n": 2, "max_tokens": 5, "seed": 1})[1]
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * (len(p1) - 1 + len(p2) - 1)
    health = get(server.url + "/health")
    assert health["prefix_reuse_tokens"] == 2 * (len(p1) - 1 + len(p2) - 1)
    assert health["prefill_tokens"] == 4 * (len(p1) + len(p2)) - health["prefix_reuse_tokens"]
    models = get(server.url + "/v1/models")
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_stop_strings_cut_text_keep_ids(server, model, tok):
    ctx = ids(tok, "the lazy dog")
    free = HFPolicy(model, tok, greedy=True, max_new_tokens=20, stop_strings=()).generate([ctx])[0]
    words = free.text.split()
    assert len(words) >= 3
    stop = words[2]  # a word the greedy continuation emits
    body = {"prompt": ctx, "max_tokens": 20, "temperature": 0, "stop": [stop], "logprobs": 1}
    code, reply = post(server.url + "/v1/completions", body)
    c = reply["choices"][0]
    assert code == 200 and c["finish_reason"] == "stop" and c["stop_reason"] == stop
    want = HFPolicy(model, tok, greedy=True, max_new_tokens=20, stop_strings=(stop,)).generate([ctx])[0]
    assert c["token_ids"] == want.token_ids and len(want.token_ids) < 20
    assert stop not in c["text"]  # vLLM's default: the stop string is cut from the text
    code, reply = post(server.url + "/v1/completions", {**body, "include_stop_str_in_output": True})
    assert reply["choices"][0]["text"].endswith(stop)
    pol = OpenAIPolicy(
        server.url, tok, greedy=True, max_new_tokens=20, stop_strings=(stop,), max_context=2048
    )
    assert pol.generate([ctx])[0].token_ids == want.token_ids


def _adapter(model, path: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(path)


def test_lora_load_changes_outputs_and_version(server, model, tok, tmp_path):
    _adapter(model, tmp_path / "a", seed=0)
    ctx = ids(tok, "who founded the company ?")
    body = {"prompt": ctx, "max_tokens": 10, "temperature": 0, "logprobs": 1}
    base = post(server.url + "/v1/completions", body)[1]["choices"][0]
    code, reply = post(
        server.url + "/v1/load_lora_adapter", {"lora_name": "step-3", "lora_path": str(tmp_path / "a")}
    )
    assert code == 200 and reply["version"] == 3
    assert [m["id"] for m in get(server.url + "/v1/models")["data"]] == ["tiny", "step-3"]
    code, lora = post(server.url + "/v1/completions", {**body, "model": "step-3"})
    assert code == 200 and lora["model"] == "step-3" and lora["treegrpo_version"] == 3
    assert lora["choices"][0]["logprobs"]["token_logprobs"] != pytest.approx(
        base["logprobs"]["token_logprobs"], abs=1e-3
    )
    # the adapter's outputs are the in-process PEFT model's
    from peft import PeftModel

    ref = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"))
    want = HFPolicy(ref, tok, greedy=True, max_new_tokens=10, stop_strings=()).generate([ctx])[0]
    assert lora["choices"][0]["token_ids"] == want.token_ids
    assert lora["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    again = post(server.url + "/v1/completions", body)[1]["choices"][0]  # base name: adapter off
    assert again["token_ids"] == base["token_ids"]
    assert again["logprobs"]["token_logprobs"] == pytest.approx(base["logprobs"]["token_logprobs"], abs=1e-5)
    assert get(server.url + "/health")["adapters"] == {"step-3": 3}
    code, err = post(server.url + "/v1/completions", {**body, "model": "step-9"})
    assert code == 404 and "step-9" in err["error"]["message"]
    assert post(server.url + "/v1/unload_lora_adapter", {"lora_name": "step-3"})[0] == 200
    assert post(server.url + "/v1/unload_lora_adapter", {"lora_name": "step-3"})[0] == 404
    back = post(server.url + "/v1/completions", body)[1]["choices"][0]
    assert back["token_ids"] == base["token_ids"]
    code, err = post(
        server.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "nope")}
    )
    assert code == 400 and "adapter" in err["error"]["message"]


def test_reload_weights_from_checkpoint(server, model, tok, tmp_path):
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ckpt = tmp_path / "step-000007"
    new.save_pretrained(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 7, "data_position": 0, "extra": {}}))
    ctx = ids(tok, "the fox jumps")
    body = {"prompt": ctx, "max_tokens": 10, "temperature": 0, "logprobs": 1}
    before = post(server.url + "/v1/completions", body)[1]
    code, reply = post(server.url + "/reload_weights", {"path": str(ckpt)})
    assert code == 200 and reply["version"] == 7
    after = post(server.url + "/v1/completions", body)[1]
    want = HFPolicy(new, tok, greedy=True, max_new_tokens=10, stop_strings=()).generate([ctx])[0]
    assert after["choices"][0]["token_ids"] == want.token_ids
    assert after["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    assert after["choices"][0]["logprobs"]["token_logprobs"] != pytest.approx(
        before["choices"][0]["logprobs"]["token_logprobs"], abs=1e-3
    )
    assert after["treegrpo_version"] == 7 and get(server.url + "/health")["version"] == 7
    assert post(server.url + "/reload_weights", {"path": str(ckpt), "version": 8})[1]["version"] == 8
    code, err = post(server.url + "/reload_weights", {"path": str(tmp_path / "missing")})
    assert code == 400 and "not a directory" in err["error"]["message"]
    (tmp_path / "empty").mkdir()
    code, err = post(server.url + "/reload_weights", {"path": str(tmp_path / "empty")})
    assert code == 400 and "no model weights" in err["error"]["message"]


def test_bad_requests_get_clear_4xx(server, tok):
    url = server.url + "/v1/completions"
    ctx = ids(tok, "the fox")
    cases = [
        (None, b"{not json", 400, "malformed JSON"),
        (None, b"[1, 2]", 400, "must be an object"),
        ({"prompt": ctx, "max_tokens": 5}, b"x" * (65 * 1024), 413, "exceeds the limit"),
        ({"prompt": [], "max_tokens": 5}, None, 400, "prompt"),
        ({"prompt": [ctx], "max_tokens": 5, "n": 9}, None, 400, "n: must be an integer in [1, 8]"),
        ({"prompt": [ctx] * 5, "max_tokens": 5, "n": 2}, None, 400, "exceeds the limit of 8"),
        ({"prompt": ctx, "max_tokens": 65}, None, 400, "max_tokens"),
        ({"prompt": [10**9], "max_tokens": 5}, None, 400, "outside the vocabulary"),
        ({"prompt": [-1], "max_tokens": 5}, None, 400, "outside the vocabulary"),
        ({"prompt": [1.5], "max_tokens": 5}, None, 400, "prompt"),
        ({"prompt": ctx * 1100, "max_tokens": 60}, None, 400, "maximum context length"),
        ({"prompt": ctx, "max_tokens": 5, "temperature": -1}, None, 400, "temperature"),
        ({"prompt": ctx, "max_tokens": 5, "stop": [3]}, None, 400, "stop"),
        ({"prompt": ctx, "max_tokens": 5, "stream": True}, None, 400, "stream"),
        ({"prompt": ctx, "max_tokens": 5, "model": "nope"}, None, 404, "does not exist"),
    ]
    for body, raw, status, msg in cases:
        code, reply = post(url, body, raw)
        assert code == status, (body, raw, reply)
        assert msg in reply["error"]["message"] and reply["error"]["code"] == status
    assert post(server.url + "/v1/load_lora_adapter", {"lora_name": "x"})[0] == 400
    assert post(server.url + "/reload_weights", {})[0] == 400
    client = OpenAIPolicy(server.url, tok, greedy=True, max_new_tokens=5, max_context=10**6)
    with pytest.raises(PolicyServerError, match="maximum context length"):
        client.generate([ctx * 1100])
    assert get(server.url + "/health")["status"] == "ok"  # still up


def test_sixteen_concurrent_clients_served_or_refused(model, tok):
    engine = PolicyEngine(copy.deepcopy(model), tok, name="tiny")
    with BackgroundServer(engine, ServerLimits(max_waiting=6)) as srv:
        codes: list[int] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            body = {"prompt": ids(tok, "the fox jumps over") + [i % 5 + 1], "max_tokens": 24, "seed": i}
            code, reply = post(srv.url + "/v1/completions", body)
            assert (code == 200 and len(reply["choices"][0]["token_ids"]) > 0) or (
                400 <= code < 600 and "error" in reply
            )
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(codes) == 16 and set(codes) <= {200, 503}
        assert codes.count(200) >= 7  # at least the one generating plus the queue's capacity
        health = get(srv.url + "/health")
        assert health["status"] == "ok" and health["requests"] == codes.count(200)


def test_concurrent_requests_are_batched_and_equal_alone(model, tok):
    """Waiting requests with the same settings share one batched generate call; greedy results are unchanged."""
    engine = PolicyEngine(copy.deepcopy(model), tok, name="tiny")
    prompts = [
        ids(tok, t) for t in ("the fox", "a lazy dog", "who founded", "over the", "search the fox jumps")
    ]
    prompts += [p + [7] for p in prompts[:3]]
    ref = HFPolicy(model, tok, greedy=True, max_new_tokens=16, stop_strings=(), prefix_cache_tokens=0)
    want = [ref.generate([p])[0] for p in prompts]
    with BackgroundServer(engine) as srv:
        got: dict[int, dict[str, Any]] = {}

        def client(i: int) -> None:
            body = {"prompt": prompts[i], "max_tokens": 16, "temperature": 0, "logprobs": 1}
            got[i] = post(srv.url + "/v1/completions", body)[1]["choices"][0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        with engine.lock:  # hold the engine so that every request queues up, then release them together
            for t in threads:
                t.start()
            while len(engine._queue) < len(prompts):
                threading.Event().wait(0.01)
        for t in threads:
            t.join(timeout=120)
    for i, w in enumerate(want):
        assert got[i]["token_ids"] == w.token_ids
        assert got[i]["logprobs"]["token_logprobs"] == pytest.approx(w.logprobs, abs=1e-5)
    assert engine.stats["requests"] == len(prompts) and engine.stats["batches"] == 1


def test_engine_failure_is_a_json_500_and_the_server_stays_up(server, tok):
    real = server.engine.policy.generate
    calls = {"n": 0}

    def flaky(contexts, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(contexts, **kw)

    server.engine.policy.generate = flaky
    body = {"prompt": ids(tok, "the fox"), "max_tokens": 3, "temperature": 0}
    code, reply = post(server.url + "/v1/completions", body)
    assert code == 500 and "RuntimeError: CUDA out of memory" in reply["error"]["message"]
    code, reply = post(server.url + "/v1/completions", body)
    assert code == 200 and len(reply["choices"][0]["token_ids"]) == 3


def test_port_in_use_is_a_user_error():
    from treegrpo.errors import UserError
    from treegrpo.policy_server import bind

    held = bind("127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match=r"--port: cannot listen on 127\.0\.0\.1:\d+"):
            bind("127.0.0.1", held.getsockname()[1])
    finally:
        held.close()
