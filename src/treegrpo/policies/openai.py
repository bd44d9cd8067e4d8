"""A `Policy` that samples from a separately served model over the OpenAI-compatible completions API.

For users who serve their policy with vLLM or SGLang (`vllm serve MODEL`) and want to evaluate it or sample
trees with treegrpo. Token ids go in (`prompt` = the context's ids) and token ids come back: vLLM's
`return_tokens_as_token_ids` makes `logprobs.tokens` read `"token_id:123"`, and newer servers also send
`choices[i].token_ids`. Only when a server returns neither do we re-tokenize its text — that breaks
token-in/token-out (the ids may differ from what was sampled), so it warns loudly.

The local tokenizer (the model's own, from the model path) builds prompts and observations and decodes the
returned ids, so a step's text is exactly the decoding of its ids, as with `HFPolicy`.

Only the stdlib is used (`urllib` + a thread pool: one request per context, the server batches them).
Every failure — refused connection, timeout, 5xx, garbage JSON — is retried a bounded number of times with
exponential backoff, then raised as `PolicyServerError` (a `UserError`: the CLI prints one line, exit 2).
A 4xx other than 408/429 is not retried: the request itself is wrong and the server's message says why.

Entropies are not part of the API. With `entropy_topk=k > 0` we request the top-k log-probs and report the
entropy of that truncated distribution (plus the leftover mass as one outcome): a lower bound on the true
entropy, enough to rank steps for `rollout.strategy: entropy`. With k = 0 (default) entropies are empty.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from treegrpo.errors import UserError
from treegrpo.protocols import Prompt, StepSample, triage_contexts

DEFAULT_STOP = ("</search>", "</answer>")
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class PolicyServerError(UserError):
    """The generation server failed or answered something we cannot use; the message says which and why."""


class SeedBox:
    """Stands in for `HFPolicy.generator`: the trainer reseeds it each step; requests derive their seeds."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.calls = 0

    def manual_seed(self, seed: int) -> SeedBox:
        self.seed, self.calls = int(seed), 0
        return self

    def request_seeds(self, n: int) -> list[int]:
        """n distinct 31-bit seeds for one generate call (deterministic in (seed, call index, row))."""
        base = (self.seed * 1_000_003 + self.calls * 97_003) % (2**31 - 1)
        self.calls += 1
        return [(base + 7_919 * i + 1) % (2**31 - 1) for i in range(n)]


def topk_entropy(logprobs: Sequence[float]) -> float:
    """Entropy (nats) of the top-k distribution plus the leftover mass as one outcome: a lower bound."""
    ps = [math.exp(x) for x in logprobs if x is not None and math.isfinite(x)]
    h = -sum(p * math.log(p) for p in ps if p > 0)
    rest = 1.0 - sum(ps)
    if rest > 1e-12:
        h -= rest * math.log(rest)
    return float(max(h, 0.0))


def encode_chat(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Chat messages → ids via the chat template (generation prompt added); token ids pass through."""
    if not prompt:
        raise ValueError("prompt is empty")
    if all(isinstance(x, int) for x in prompt):
        return [int(x) for x in prompt]  # type: ignore[arg-type]
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise ValueError("prompt must be token ids or chat messages with 'role' and 'content'")
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(x) for x in ids]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "  # type: ignore[index]
    return list(tokenizer.encode(text, add_special_tokens=False))


def api_base(url: str) -> str:
    """`http://host:port` → `http://host:port/v1`; a URL with a path (…/v1) is kept as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base url must look like http://host:port[/v1], got {url!r}")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_token_ids(choice: Mapping[str, Any]) -> list[int] | None:
    """The sampled ids of a completion choice, or None when the server did not send them."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return [int(t) for t in ids]
    lp = choice.get("logprobs")
    tokens = lp.get("tokens") if isinstance(lp, dict) else None
    if not isinstance(tokens, list):
        return None
    out: list[int] = []
    for t in tokens:
        m = _TOKEN_ID.match(t) if isinstance(t, str) else None
        if m is None:
            return None
        out.append(int(m.group(1)))
    return out


class OpenAIPolicy:
    """Samples agent steps from an OpenAI-compatible completions server (implements `protocols.Policy`)."""

    def __init__(
        self,
        base_url: str,
        tokenizer: Any,
        *,
        model: str = "",
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        stop_strings: Sequence[str] = DEFAULT_STOP,
        max_context: int | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
        timeout: float = 120.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        concurrency: int = 32,
        entropy_topk: int = 0,
        api_key: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        check: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if tokenizer is None:
            raise ValueError("tokenizer is required: prompts and observations are tokenized locally")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if entropy_topk < 0:
            raise ValueError(f"entropy_topk must be >= 0, got {entropy_topk}")
        self.base_url = api_base(base_url)
        self.tokenizer = tokenizer
        self.model_name = model
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.greedy = greedy or temperature == 0
        self.stop_strings = tuple(stop_strings)
        self.max_context = max_context or int(getattr(tokenizer, "model_max_length", 0) or 0) or 1 << 30
        if self.max_context > 1 << 30:  # "unbounded" sentinel of some tokenizers
            self.max_context = 1 << 30
        self.vocab_size = vocab_size or len(tokenizer)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self.entropy_topk = int(entropy_topk)
        self.api_key = api_key
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self.generator = SeedBox(seed)
        self.stats = {"requests": 0, "retries": 0, "prefill_tokens": 0, "generated_tokens": 0, "calls": 0}
        self._warned: set[str] = set()
        if check:
            self.model_name = self._check_server()

    # -- protocol -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_chat(self.tokenizer, prompt)

    def encode_observation(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def generate(
        self, contexts: Sequence[Sequence[int]], stop: Sequence[str] | None = None
    ) -> list[StepSample]:
        """One completion request per context (sent concurrently); stops at a stop tag, EOS or the budget.

        `stop` (an environment's `stop_strings`) replaces the policy's own stop strings for this call.
        """
        stops = self.stop_strings if stop is None else tuple(str(s) for s in stop if s)
        out, work = triage_contexts(contexts, self.max_context, self.vocab_size)
        seeds = self.generator.request_seeds(len(contexts))
        if work:
            jobs = [([int(t) for t in contexts[i]], seeds[i], stops) for i in work]
            if len(jobs) == 1 or self.concurrency == 1:
                results = [self._complete(*job) for job in jobs]
            else:
                with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
                    results = list(pool.map(lambda job: self._complete(*job), jobs))
            for i, sample in zip(work, results, strict=True):
                out[i] = sample
        self.stats["calls"] += 1
        return [o for o in out if o is not None]

    # -- HTTP ---------------------------------------------------------------------------------------
    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(extra or {})
        return h

    def _request(
        self, path: str, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        """GET (body None) or POST JSON with bounded retries; returns the decoded JSON reply."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        last = "no attempt made"
        attempts = 1 + self.max_retries
        for attempt in range(attempts):
            if attempt:
                self.stats["retries"] += 1
                self._sleep(self.backoff * (2 ** (attempt - 1)))
            self.stats["requests"] += 1
            req = urllib.request.Request(
                url, data=data, method="GET" if data is None else "POST", headers=self._headers(headers)
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                last = f"HTTP {e.code}{': ' + detail if detail else ''}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # the request itself is wrong: retrying cannot help
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, UnicodeDecodeError) as e:  # includes json.JSONDecodeError
                last = f"bad reply: {e}"
        raise PolicyServerError(f"generation server {url} failed after {attempt + 1} attempt(s): {last}")

    def _check_server(self) -> str:
        """Fail fast if the server is unreachable; pick (or check) the served model name."""
        reply = self._request("/models")
        data = reply.get("data") if isinstance(reply, dict) else None
        served = [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")] if data else []
        if not served:
            raise PolicyServerError(f"generation server {self.base_url}/models lists no models")
        if not self.model_name:
            return served[0]
        if self.model_name not in served:
            raise PolicyServerError(
                f"policy.api_model: {self.model_name!r} is not served by {self.base_url} "
                f"(it serves {', '.join(served[:5])})"
            )
        return self.model_name

    def _body(self, ctx: list[int], seed: int, stops: tuple[str, ...]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": ctx,
            "max_tokens": min(self.max_new_tokens, self.max_context - len(ctx)),
            "temperature": 0.0 if self.greedy else self.temperature,
            "top_p": 1.0 if self.greedy else self.top_p,
            "n": 1,
            "logprobs": max(1, self.entropy_topk),
            "stop": list(stops),
            # vLLM extensions: ids instead of token strings, keep the stop tag, no detokenizer cleanup.
            "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
        }
        if not self.greedy:
            body["seed"] = seed
        body.update(self.extra_body)
        return body

    def complete(
        self,
        ctx: list[int],
        seed: int,
        headers: Mapping[str, str] | None = None,
        stops: Sequence[str] | None = None,
    ) -> StepSample:
        """One context's step (no triage), for the router (`routing.py`): extra headers, and stop strings
        replacing the policy's own for this request (None: the policy's)."""
        return self._complete(ctx, seed, self.stop_strings if stops is None else tuple(stops), headers)

    def _complete(
        self, ctx: list[int], seed: int, stops: tuple[str, ...], headers: Mapping[str, str] | None = None
    ) -> StepSample:
        reply = self._request("/completions", self._body(ctx, seed, stops), headers)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise PolicyServerError(f"generation server {self.base_url}: reply has no choices")
        choice = choices[0]
        ids = parse_token_ids(choice)
        lp = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else {}
        token_lps = lp.get("token_logprobs")
        if ids is None:
            self._warn_once(
                "ids",
                f"generation server {self.base_url} returned no token ids (needs vLLM's "
                "return_tokens_as_token_ids or token_ids); re-tokenizing its text instead. This breaks "
                "token-in/token-out: trained ids may differ from the sampled ones.",
            )
            ids = list(self.tokenizer.encode(str(choice.get("text", "")), add_special_tokens=False))
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise PolicyServerError(
                f"generation server {self.base_url} returned token ids outside the local vocabulary "
                f"[0, {self.vocab_size}): {bad[:5]} — does it serve the same model/tokenizer as model.path?"
            )
        if isinstance(token_lps, list) and len(token_lps) == len(ids):
            logprobs = [float(x) if isinstance(x, int | float) else 0.0 for x in token_lps]
        else:
            self._warn_once(
                "logprobs",
                f"generation server {self.base_url} returned no per-token log-probs matching its tokens; "
                "recording 0.0 (fine for evaluation, not for training)",
            )
            logprobs = [0.0] * len(ids)
        entropies: list[float] = []
        top = lp.get("top_logprobs")
        if self.entropy_topk and isinstance(top, list) and len(top) == len(ids):
            entropies = [topk_entropy(list(d.values())) if isinstance(d, dict) else 0.0 for d in top]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if (
            choice.get("finish_reason") == "stop"
            and isinstance(choice.get("stop_reason"), str)
            and not any(s in text for s in stops)
        ):
            self._warn_once(
                "trim",
                f"generation server {self.base_url} trimmed the stop tag from its output; the agent's "
                "actions will look unterminated (vLLM: include_stop_str_in_output; SGLang: no_stop_trim "
                "via extra_body)",
            )
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prefill = len(ctx) - int(cached) if isinstance(cached, int) else len(ctx)
        self.stats["prefill_tokens"] += prefill
        self.stats["generated_tokens"] += len(ids)
        return StepSample(
            token_ids=ids, logprobs=logprobs, text=text, entropies=entropies, prefill_tokens=prefill
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's own error message (OpenAI-style {"error": {"message": ...}} or {"message": ...})."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - best effort: the status code alone is still reported
        return ""
    try:
        payload = json.loads(raw)
    except ValueError:
        return raw.strip().splitlines()[0][:200] if raw.strip() else ""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg).strip().splitlines()[0][:200]
    return ""


__all__ = [
    "OpenAIPolicy",
    "PolicyServerError",
    "SeedBox",
    "api_base",
    "encode_chat",
    "parse_token_ids",
    "topk_entropy",
]
