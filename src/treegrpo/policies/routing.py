"""Rollouts on one or more OpenAI-compatible servers, with every node of a tree on the same replica.

Siblings in a tree share their whole context; a server's prefix cache (vLLM's automatic prefix caching,
SGLang's radix cache, `serve-policy`'s HFPolicy KV cache) only helps if they land on the same replica.
The sticky key needs no change to the `Policy` protocol: the sampler encodes each prompt through
`encode_prompt` before any `generate`, so we remember those prompt ids, and every later context of that
tree starts with them. A context's key is the hash of the registered prompt it extends (contexts we have
not seen a prompt for fall back to the hash of their first tokens). Trees of one forest share a prompt, so
a whole forest goes to one server.

A key keeps the server it was first sent to; a new key goes to the least-loaded server of its call
(ties broken by rendezvous hashing), so even a few trees spread over the servers. Requests carry the key
as an `X-Session-ID` header (what session-affinity routers such as vllm-router / sglang-router hash on),
and each server's requests are sent ordered by key so siblings go out together. `routing: round_robin`
spreads each call's contexts evenly and `random` picks a server per request: the baselines the benchmark
compares against (round-robin keeps some accidental affinity: a branch at the same position of the next
call lands on the same server).

Weight versions: `use_version(v, model_name)` is called by the weight sync after the servers hold version
v (for LoRA the requests then name the adapter `step-v`); each sampled step records the version it was sent
with (`take_versions`), so the trainer can bound staleness.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from treegrpo.policies.openai import OpenAIPolicy, SeedBox
from treegrpo.protocols import Prompt, StepSample, triage_contexts

Routing = Literal["sticky", "round_robin", "random"]
SESSION_HEADER = "X-Session-ID"


def parse_base_urls(value: str | Sequence[str]) -> list[str]:
    """`"http://a:1, http://b:2"` or a list → the distinct URLs, in order; raises ValueError when none."""
    items = value.replace("\n", ",").split(",") if isinstance(value, str) else list(value)
    urls = list(dict.fromkeys(u.strip() for u in items if isinstance(u, str) and u.strip()))
    if not urls:
        raise ValueError("no server URL given (http://host:port, comma-separated for several)")
    return urls


def ids_hash(ids: Sequence[int] | np.ndarray) -> int:
    """A stable 63-bit hash of token ids (the same in every process, unlike `hash`)."""
    raw = np.asarray(ids, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


def rendezvous(key: int, n: int) -> int:
    """The server (0..n-1) with the highest hash of (key, server): stable, balanced, minimal reshuffle."""
    scores = [hashlib.blake2b(f"{key}:{i}".encode(), digest_size=8).digest() for i in range(n)]
    return max(range(n), key=lambda i: scores[i])


class StickyKeys:
    """Maps a context to the key of the registered prompt it extends (its tree's root prompt)."""

    def __init__(self, max_prompts: int = 8192, fallback_tokens: int = 64) -> None:
        self.max_prompts = max_prompts
        self.fallback_tokens = fallback_tokens
        self._by_len: dict[int, OrderedDict[int, None]] = {}
        self._order: OrderedDict[tuple[int, int], None] = OrderedDict()

    def register(self, prompt_ids: Sequence[int]) -> int:
        n, key = len(prompt_ids), ids_hash(prompt_ids)
        self._by_len.setdefault(n, OrderedDict())[key] = None
        self._order[(n, key)] = None
        self._order.move_to_end((n, key))
        while len(self._order) > self.max_prompts:
            (old_n, old_key), _ = self._order.popitem(last=False)
            self._by_len[old_n].pop(old_key, None)
            if not self._by_len[old_n]:
                del self._by_len[old_n]
        return key

    def key_of(self, context: Sequence[int]) -> int:
        """The longest registered prompt that prefixes `context`; else a hash of its first tokens."""
        arr = np.asarray(context, dtype=np.int64)
        for n in sorted((k for k in self._by_len if k <= len(arr)), reverse=True):
            key = ids_hash(arr[:n])
            if key in self._by_len[n]:
                return key
        return ids_hash(arr[: self.fallback_tokens])


class RoutedPolicy:
    """`protocols.Policy` over N OpenAI-compatible servers (one `OpenAIPolicy` client each)."""

    def __init__(
        self,
        clients: Sequence[OpenAIPolicy],
        *,
        routing: Routing = "sticky",
        seed: int = 0,
        version: int = 0,
        session_header: str = SESSION_HEADER,
    ) -> None:
        if not clients:
            raise ValueError("at least one server client is required")
        if routing not in ("sticky", "round_robin", "random"):
            raise ValueError(f"routing must be 'sticky', 'round_robin' or 'random', got {routing!r}")
        self.clients = list(clients)
        self.routing = routing
        self.session_header = session_header
        self.tokenizer = self.clients[0].tokenizer
        self.max_context = min(c.max_context for c in self.clients)
        self.vocab_size = self.clients[0].vocab_size
        self.generator = SeedBox(seed)
        self.keys = StickyKeys()
        self.version = int(version)
        self._sampled_versions: list[int] = []
        self._rr = 0
        self._homes: OrderedDict[int, int] = OrderedDict()  # sticky key -> server
        self.max_homes = 65536
        n = len(self.clients)
        self.server_stats = [{"requests": 0, "prompt_tokens": 0, "prefill_tokens": 0} for _ in range(n)]
        self.stats = {
            "requests": 0,
            "prompt_tokens": 0,
            "prefill_tokens": 0,
            "generated_tokens": 0,
            "calls": 0,
        }
        self.last_routes: list[tuple[int, int]] = []  # (key, server) per context of the last generate call

    # -- what callers read ------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return ",".join(c.base_url for c in self.clients)

    @property
    def model_name(self) -> str:
        return self.clients[0].model_name

    @property
    def server_prefix_hit(self) -> float:
        """The share of prompt tokens the servers did not recompute (needs servers reporting cached_tokens)."""
        p = self.stats["prompt_tokens"]
        return 1.0 - self.stats["prefill_tokens"] / p if p else 0.0

    # -- protocol -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        ids = self.clients[0].encode_prompt(prompt)
        self.keys.register(ids)
        return ids

    def encode_observation(self, text: str) -> list[int]:
        return self.clients[0].encode_observation(text)

    def generate(
        self, contexts: Sequence[Sequence[int]], stop: Sequence[str] | None = None
    ) -> list[StepSample]:
        """Each context to its server (siblings together); `stop` replaces the clients' stop strings."""
        stops = None if stop is None else tuple(str(s) for s in stop if s)
        version = self.version  # as sent: a sync racing this call can only make staleness over-reported
        out, work = triage_contexts(contexts, self.max_context, self.vocab_size)
        seeds = self.generator.request_seeds(len(contexts))
        keys = [self.keys.key_of(contexts[i]) for i in work]
        servers = self._assign(keys)
        self.last_routes = list(zip(keys, servers, strict=True))
        per_server: dict[int, list[int]] = {}
        for j in sorted(range(len(work)), key=lambda j: (servers[j], keys[j], j)):  # siblings adjacent
            per_server.setdefault(servers[j], []).append(j)
        results: dict[int, StepSample] = {}
        pools = {
            s: ThreadPoolExecutor(max_workers=min(self.clients[s].concurrency, len(js)))
            for s, js in per_server.items()
        }
        try:
            futures = {
                j: pools[s].submit(
                    self.clients[s].complete,
                    [int(t) for t in contexts[work[j]]],
                    seeds[work[j]],
                    {self.session_header: f"{keys[j]:016x}"},
                    stops,
                )
                for s, js in per_server.items()
                for j in js
            }
            for j, f in futures.items():
                results[j] = f.result()
        finally:
            for p in pools.values():
                p.shutdown(wait=True, cancel_futures=True)
        for j, i in enumerate(work):
            s, sample = servers[j], results[j]
            prompt = len(contexts[i])
            for d in (self.stats, self.server_stats[s]):
                d["requests"] += 1
                d["prompt_tokens"] += prompt
                d["prefill_tokens"] += int(sample.prefill_tokens)
            self.stats["generated_tokens"] += len(sample.token_ids)
            out[i] = sample
        self._sampled_versions.extend([version] * len(work))
        self.stats["calls"] += 1
        return [o for o in out if o is not None]

    def _assign(self, keys: list[int]) -> list[int]:
        n = len(self.clients)
        if n == 1:
            return [0] * len(keys)
        if self.routing == "round_robin":
            start, self._rr = self._rr, (self._rr + len(keys)) % n
            return [(start + j) % n for j in range(len(keys))]
        if self.routing == "random":  # no affinity at all (seeded: the same run routes the same way)
            rng = np.random.default_rng([self.generator.seed, self.stats["calls"], 7])
            return [int(x) for x in rng.integers(0, n, size=len(keys))]
        # Sticky: a key keeps the server it was first sent to. A new key goes to the server with the least
        # work in this call (ties: its rendezvous choice), so a small batch of new trees still spreads out.
        counts: dict[int, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        load = [0] * n
        for k, c in counts.items():
            if k in self._homes:
                self._homes.move_to_end(k)
                load[self._homes[k]] += c
        for k, c in counts.items():
            if k not in self._homes:
                pref = rendezvous(k, n)
                s = min(range(n), key=lambda i: (load[i], i != pref, i))
                self._homes[k] = s
                load[s] += c
        while len(self._homes) > self.max_homes:
            self._homes.popitem(last=False)
        return [self._homes[k] for k in keys]

    # -- weight versions ----------------------------------------------------------------------------
    def use_version(self, version: int, model_name: str | None = None) -> None:
        """From now on requests are sent for weight `version` (and, for LoRA, name adapter `model_name`)."""
        self.version = int(version)
        if model_name is not None:
            for c in self.clients:
                c.model_name = model_name

    def take_versions(self) -> list[int]:
        """The weight version of every step sampled since the last call (then forgets them)."""
        out, self._sampled_versions = self._sampled_versions, []
        return out


def served_policy(
    base_url: str | Sequence[str],
    tokenizer: Any,
    *,
    routing: Routing = "sticky",
    seed: int = 0,
    client_kwargs: Mapping[str, Any] | None = None,
) -> RoutedPolicy:
    """The `policy.backend: openai` policy: one client per URL (each checks its server), routed."""
    kw = dict(client_kwargs or {})
    kw.pop("seed", None)
    clients = [OpenAIPolicy(url, tokenizer, seed=seed, **kw) for url in parse_base_urls(base_url)]
    served = {c.model_name for c in clients}
    if len(served) > 1:
        raise ValueError(
            f"the servers serve different models ({', '.join(sorted(served))}); set policy.api_model"
        )
    return RoutedPolicy(clients, routing=routing, seed=seed)


def policy_for_config(
    cfg: Any, tokenizer: Any, max_context: int | None, *, greedy: bool, seed: int, **client_kwargs: Any
) -> RoutedPolicy:
    """`policy.backend: openai` from a run config (what `make_policy` builds, for eval, rollout and train)."""
    from treegrpo.errors import UserError

    pc = cfg.policy
    if not pc.base_url:
        raise UserError("policy.base_url: required when policy.backend is 'openai' (--base-url)")
    kw = dict(
        model=pc.api_model,
        temperature=pc.temperature,
        top_p=pc.top_p,
        max_new_tokens=pc.max_new_tokens,
        greedy=greedy or pc.temperature == 0,
        max_context=max_context,
        timeout=pc.request_timeout if pc.request_timeout > 0 else 120.0,
        max_retries=pc.max_retries,
        entropy_topk=pc.entropy_topk,
    )
    kw.update(client_kwargs)
    try:
        return served_policy(pc.base_url, tokenizer, routing=pc.routing, seed=seed, client_kwargs=kw)
    except ValueError as e:
        raise UserError(f"policy.base_url: {e}") from None


__all__ = [
    "RoutedPolicy",
    "StickyKeys",
    "ids_hash",
    "parse_base_urls",
    "policy_for_config",
    "rendezvous",
    "served_policy",
]
