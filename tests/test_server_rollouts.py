"""Rollouts on `serve-policy` servers: sticky routing, prefix reuse, weight sync, staleness (real HTTP)."""

from __future__ import annotations

import copy
import json
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from policy_servers import serve_models
from treegrpo.models import tiny_causal_lm
from treegrpo.policies import HFPolicy
from treegrpo.policies.routing import (
    RoutedPolicy,
    StickyKeys,
    ids_hash,
    parse_base_urls,
    rendezvous,
    served_policy,
)
from treegrpo.protocols import Policy, StepResult
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import ActionKind
from treegrpo.weight_sync import (
    FullWeightSync,
    LoraSync,
    NoSync,
    StaleRolloutError,
    check_staleness,
    logprob_mismatch,
    make_weight_sync,
    staleness,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["who founded the company ? search answer the fox jumps over a lazy dog ."])


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=5)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def test_url_parsing_and_hashing():
    assert parse_base_urls("http://a:1, http://b:2,,http://a:1") == ["http://a:1", "http://b:2"]
    assert parse_base_urls(["http://a:1"]) == ["http://a:1"]
    with pytest.raises(ValueError, match="no server URL"):
        parse_base_urls(" , ")
    assert ids_hash([1, 2, 3]) == ids_hash(np.array([1, 2, 3])) != ids_hash([1, 2, 4])
    picks = [rendezvous(k, 3) for k in range(300)]
    assert set(picks) == {0, 1, 2} and min(picks.count(i) for i in range(3)) > 60  # balanced
    assert [rendezvous(k, 3) for k in range(300)] == picks  # stable
    # adding a 4th server only moves keys onto the new server
    assert all(rendezvous(k, 4) in (p, 3) for k, p in enumerate(picks))
    keys = StickyKeys(fallback_tokens=2)
    a, b = keys.register([5, 6, 7]), keys.register([5, 6, 7, 8, 9])
    assert keys.key_of([5, 6, 7, 1, 1]) == a  # extends the first prompt only
    assert keys.key_of([5, 6, 7, 8, 9, 4]) == b  # the longest registered prompt wins
    assert keys.key_of([9, 9, 9]) == keys.key_of([9, 9, 1]) == ids_hash([9, 9])  # fallback: first tokens


def test_sticky_siblings_hit_one_servers_prefix_cache(model, tok):
    """An expansion's siblings share their node's context: sticky sends them where that context's KV is."""
    texts = ["who founded the company ?", "the fox jumps over", "over a lazy dog", "company ? search"]
    obs = ids(tok, " the fox .")
    with serve_models([model, model], tok) as servers:
        urls = ",".join(s.url for s in servers)
        for routing in ("sticky", "round_robin"):
            for s in servers:
                s.engine.reset_prefix_cache()
            pol = served_policy(
                urls, tok, routing=routing, seed=1, client_kwargs={"max_new_tokens": 6, "max_context": 2048}
            )
            assert isinstance(pol, Policy)
            prompts = [pol.encode_prompt(ids(tok, t)) for t in texts]
            first = pol.generate(prompts)  # the nodes' own steps
            assert {srv for _, srv in pol.last_routes} == {0, 1}  # both servers used
            homes = [srv for _, srv in pol.last_routes]
            # four siblings expanded from each node: context = prompt + step + observation
            contexts = [p + f.token_ids + obs for p, f in zip(prompts, first, strict=True) for _ in range(4)]
            before = [health(s.url) for s in servers]
            out = pol.generate(contexts)
            assert len(out) == 16 and all(len(s.token_ids) == len(s.logprobs) > 0 for s in out)
            after = [health(s.url) for s in servers]
            prefill = sum(
                a["prefill_tokens"] - b["prefill_tokens"] for a, b in zip(after, before, strict=True)
            )
            reused = sum(
                a["prefix_reuse_tokens"] - b["prefix_reuse_tokens"]
                for a, b in zip(after, before, strict=True)
            )
            routes = defaultdict(set)
            for j, (key, server) in enumerate(pol.last_routes):
                routes[j // 4].add(server)
                assert key == ids_hash(prompts[j // 4])  # keyed by the tree's root prompt
            if routing == "sticky":
                assert all(routes[i] == {homes[i]} for i in range(4))  # siblings on their node's server
                # nothing of the node's context before its last step token was recomputed (siblings batched
                # together each prefill that token and the observation; one served after another, less)
                assert 16 <= prefill <= 16 * (1 + len(obs))
                assert reused >= sum(
                    4 * (len(p) + len(f.token_ids) - 1) for p, f in zip(prompts, first, strict=True)
                )
                assert pol.stats["prefill_tokens"] == sum(len(p) for p in prompts) + prefill  # from usage
                total = sum(len(c) for c in prompts + contexts)
                assert pol.server_prefix_hit == pytest.approx(1 - pol.stats["prefill_tokens"] / total)
            else:
                assert all(len(v) == 2 for v in routes.values())  # siblings split over both servers
                # the siblings sent away from their node's server recompute its whole context there
                assert prefill >= sum(
                    len(p) + len(f.token_ids) + len(obs) for p, f in zip(prompts, first, strict=True)
                )


class _Env:
    """Two searches then an answer; the observation grows every context."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def start(self, row):
        return (row["q"], 0), ids(self.tok, row["q"])

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


def test_tree_rollout_sticky_every_node_on_one_server(model, tok):
    rows = [
        {"q": q}
        for q in ("who founded the company ?", "the fox jumps", "over a lazy dog", "company ? search")
    ]
    with serve_models([model, model], tok) as servers:
        pol = served_policy(
            ",".join(s.url for s in servers),
            tok,
            seed=2,
            client_kwargs={"max_new_tokens": 5, "max_context": 2048},
        )
        seen: dict[int, set[int]] = defaultdict(set)
        inner = pol.generate

        def spy(contexts):
            out = inner(contexts)
            for key, server in pol.last_routes:
                seen[key].add(server)
            return out

        pol.generate = spy  # type: ignore[method-assign]
        cfg = RolloutConfig(strategy="random", m=2, n=2, l=1)
        res = sample_forests(rows, ["a", "b", "c", "d"], pol, _Env(tok), cfg, np.random.default_rng(0))
        roots = {ids_hash(ids(tok, r["q"])) for r in rows}
        assert set(seen) == roots  # every context was keyed by its tree's root prompt
        assert all(len(s) == 1 for s in seen.values())  # and all of a tree's nodes went to one server
        assert {next(iter(s)) for s in seen.values()} == {0, 1}
        hs = [health(s.url) for s in servers]
        assert sum(h["prompt_tokens"] for h in hs) == pol.stats["prompt_tokens"]
        assert (
            sum(h["prefill_tokens"] for h in hs)
            == pol.stats["prefill_tokens"]
            == res.budget["prefill_tokens_reported"]
        )
        assert pol.server_prefix_hit > 0.5  # later steps and expansions reuse the earlier KV
        assert pol.take_versions() == [0] * pol.stats["requests"] and pol.take_versions() == []


def _lora_model(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    _nudge(m, 0.5, only="lora_B")
    return m


def _nudge(m, scale: float, only: str = "") -> None:
    with torch.no_grad():
        for n, p in m.named_parameters():
            if only in n and p.is_floating_point():
                p.add_(torch.randn_like(p) * scale)


def _served_vs_local(pol, local_model, tok, ctxs) -> float:
    """Mean |served − in-process| log-prob over the served greedy steps."""
    got = pol.generate(ctxs)
    ref = HFPolicy(local_model, tok, greedy=True, max_new_tokens=8, stop_strings=())
    want = ref.generate(ctxs)
    if [g.token_ids for g in got] != [w.token_ids for w in want]:
        return float("inf")
    return logprob_mismatch([x for g in got for x in g.logprobs], [x for w in want for x in w.logprobs])


def test_lora_sync_follows_trainer_and_stale_guard(model, tok, tmp_path):
    trainer = _lora_model(model, seed=0)
    ctxs = [ids(tok, "who founded the company ?"), ids(tok, "the fox")]
    with serve_models([model, model], tok) as servers:
        urls = ",".join(s.url for s in servers)
        kw = {"max_new_tokens": 8, "max_context": 2048, "greedy": True, "stop_strings": ()}
        pol = served_policy(urls, tok, client_kwargs=kw)
        sync = make_weight_sync("auto", trainer, tmp_path / "sync", urls, pol)
        assert isinstance(sync, LoraSync)
        for step in (0, 1, 2, 3):
            if step:
                _nudge(trainer, 0.3, only="lora_")  # an "optimizer step"
            assert sync.sync(trainer, step) == step
            assert pol.model_name == f"step-{step}" and pol.version == step
            assert _served_vs_local(pol, trainer, tok, ctxs) < 1e-5  # rounding level
            assert set(pol.take_versions()) == {step}
            assert check_staleness(step, [step, step], max_staleness=0) == 0
        for s in servers:
            assert health(s.url)["adapters"] == {"step-2": 2, "step-3": 3}  # keep_last=2: older unloaded
        assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["step-000002", "step-000003"]

        frozen = served_policy(urls, tok, client_kwargs=kw)  # sync disabled: the servers keep version 0
        off = NoSync(frozen.version)
        versions = []
        for step in (1, 2):
            _nudge(trainer, 0.3, only="lora_")
            assert off.sync(trainer, step) == 0
            assert _served_vs_local(frozen, trainer, tok, ctxs) > 1e-3  # the mismatch grows
            versions = frozen.take_versions()
        assert staleness(2, versions) == 2
        with pytest.raises(StaleRolloutError, match="max_staleness"):
            check_staleness(2, versions, max_staleness=1)


def test_full_weight_sync_reloads_servers(model, tok, tmp_path):
    trainer = copy.deepcopy(model)
    ctxs = [ids(tok, "a lazy dog ."), ids(tok, "the fox jumps")]
    with serve_models([model], tok) as servers:
        kw = {"max_new_tokens": 8, "max_context": 2048, "greedy": True, "stop_strings": ()}
        pol = served_policy(servers[0].url, tok, client_kwargs=kw)
        sync = make_weight_sync("full", trainer, tmp_path / "full", servers[0].url, pol)
        assert isinstance(sync, FullWeightSync)
        _nudge(trainer, 0.2)
        assert _served_vs_local(pol, trainer, tok, ctxs) > 1e-3  # not synced yet
        assert sync.sync(trainer, 1) == 1 and pol.version == 1 and health(servers[0].url)["version"] == 1
        assert _served_vs_local(pol, trainer, tok, ctxs) < 1e-5
        assert pol.model_name == "tiny"  # full weights keep the served name
        with pytest.raises(Exception, match="lora needs a LoRA"):
            make_weight_sync("lora", trainer, tmp_path / "x", servers[0].url, pol).sync(trainer, 2)


def test_policy_for_config_reads_policy_section(model, tok):
    from treegrpo.config import ConfigError, load_config
    from treegrpo.errors import UserError
    from treegrpo.policies.routing import policy_for_config

    with serve_models([model, model], tok) as servers:
        urls = f"{servers[0].url}, {servers[1].url}/v1"
        cfg = load_config(
            None,
            [
                "policy.backend=openai",
                f"policy.base_url={urls}",
                "policy.routing=round_robin",
                "policy.max_new_tokens=7",
            ],
        )
        pol = policy_for_config(cfg, tok, 2048, greedy=True, seed=3)
        assert pol.routing == "round_robin" and len(pol.clients) == 2 and pol.model_name == "tiny"
        assert pol.base_url == f"{servers[0].url}/v1,{servers[1].url}/v1"
        assert all(c.max_new_tokens == 7 and c.greedy for c in pol.clients)
        out = pol.generate([ids(tok, "the fox")] * 2)
        assert out[0].token_ids == out[1].token_ids and [s for _, s in pol.last_routes] == [0, 1]
    with pytest.raises(UserError, match="policy.base_url: required"):
        policy_for_config(load_config(None, ["policy.backend=openai"]), tok, 2048, greedy=True, seed=0)
    with pytest.raises(UserError, match="policy.base_url"):
        policy_for_config(load_config(None, ["policy.base_url=localhost:1"]), tok, 2048, greedy=True, seed=0)
    with pytest.raises(ConfigError, match="policy.routing"):
        load_config(None, ["policy.routing=hash"])
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        load_config(None, ["trainer.max_staleness=-1"])


def test_full_sync_sglang_api_posts_update_weights_from_disk(model, tmp_path):
    """The SGLang mapping of the hook: POST /update_weights_from_disk {model_path} with a complete HF dir."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802 - stdlib name
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            raw = b'{"success": true, "message": "ok"}'
            code = 200 if self.path == "/update_weights_from_disk" else 404
            self.send_response(code)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        sync = FullWeightSync(tmp_path / "w", url, None, api="sglang")
        assert sync.sync(model, 4) == 4
        path, body = seen[-1]
        assert path == "/update_weights_from_disk" and Path(body["model_path"]).name == "step-000004"
        assert (Path(body["model_path"]) / "config.json").is_file()
        with pytest.raises(Exception, match="HTTP 404"):
            FullWeightSync(tmp_path / "v", url, None).sync(model, 1)  # no /reload_weights there
    finally:
        srv.shutdown()
        srv.server_close()


def test_assignment_rules_without_servers():
    from types import SimpleNamespace

    fake = [SimpleNamespace(tokenizer=None, max_context=100, vocab_size=10, concurrency=4) for _ in range(3)]
    sticky = RoutedPolicy(fake, routing="sticky")
    first = sticky._assign([11, 22, 33, 11])
    assert first[0] == first[3] and sorted(set(first)) == [0, 1, 2]  # new keys spread, a key stays put
    assert sticky._assign([33, 44, 22]) == [first[2], sticky._homes[44], first[1]]
    rr = RoutedPolicy(fake, routing="round_robin")
    assert rr._assign([1, 1, 1, 1]) == [0, 1, 2, 0] and rr._assign([1, 1]) == [1, 2]
    rnd = [RoutedPolicy(fake, routing="random", seed=5) for _ in range(2)]
    picks = [r._assign(list(range(60))) for r in rnd]
    assert picks[0] == picks[1] and set(picks[0]) == {0, 1, 2}  # seeded, uses every server
    with pytest.raises(ValueError, match="routing must be"):
        RoutedPolicy(fake, routing="hash")


def test_environment_stop_strings_pass_through_the_router(model, tok):
    """`generate(contexts, stop=...)` (an environment's stop strings) reaches the server for that call."""
    ctx = ids(tok, "the lazy dog")
    free = HFPolicy(model, tok, greedy=True, max_new_tokens=20, stop_strings=()).generate([ctx])[0]
    stop = free.text.split()[2]
    want = HFPolicy(model, tok, greedy=True, max_new_tokens=20, stop_strings=(stop,)).generate([ctx])[0]
    with serve_models([model], tok) as servers:
        kw = {"max_new_tokens": 20, "max_context": 2048, "greedy": True, "stop_strings": ()}
        pol = served_policy(servers[0].url, tok, client_kwargs=kw)
        assert pol.generate([ctx])[0].token_ids == free.token_ids  # the clients' own (no) stop strings
        got = pol.generate([ctx], stop=[stop])[0]
        assert got.token_ids == want.token_ids and len(got.token_ids) < len(free.token_ids)
        assert got.text.rstrip().endswith(stop)
        assert pol.clients[0].stop_strings == ()  # the call's stops did not stick
