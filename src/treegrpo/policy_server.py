"""`treegrpo serve-policy`: an OpenAI-compatible completions server over a `PolicyEngine` (starlette + uvicorn).

It speaks the subset of vLLM's API that token-in/token-out training needs, so the same client trains
against it, against `vllm serve` and against SGLang:

- ``POST /v1/completions``: `prompt` is token ids (a list of ints, or a list of such lists; text is
  tokenized with the model's tokenizer), `max_tokens`, `temperature` (0 = greedy), `top_p`, `seed`, `stop`,
  `n`, `logprobs`. Each choice carries `token_ids` and `logprobs.tokens` as ``"token_id:N"`` (with
  `return_tokens_as_token_ids`) plus `token_logprobs` (log-probs of softmax(logits / temperature), as
  `HFPolicy` reports them). `usage.prompt_tokens_details.cached_tokens` counts prompt tokens served from
  the prefix cache; `treegrpo_version` is the weight/adapter version that sampled. `top_logprobs` holds
  only the sampled token (whatever `logprobs` asks for), so `policy.entropy_topk` sees a top-1 bound.
- ``GET /v1/models``; ``POST /v1/load_lora_adapter {lora_name, lora_path}`` and
  ``POST /v1/unload_lora_adapter {lora_name}`` (vLLM's names; requests then use ``model: lora_name``).
- ``POST /reload_weights {path, version?}``: full weights from a checkpoint dir (vLLM:
  ``/collective_rpc`` with ``update_weights``-style RPCs, or a restart; SGLang: ``/update_weights_from_disk
  {model_path}``). See docs/scale-out.md.
- ``POST /reset_prefix_cache`` (vLLM's name) empties the prefix cache.
- ``GET /health``: version, adapters and the prefix-reuse counters.

Bounded: body bytes, prompts per request, prompt tokens, `max_tokens`, and requests waiting for the engine
(beyond that: 503). Every bad request gets a 4xx JSON error ``{"error": {"message", "type", "code"}}``.
Binds 127.0.0.1 by default: there is no authentication.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from treegrpo.policy_engine import Completion, EngineError, PolicyEngine, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how many may wait for the engine."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_prompts: int = 256  # prompts x n per request
    max_prompt_tokens: int = 262_144  # summed over the request's prompts
    max_tokens: int = 4096
    max_stop: int = 16
    max_waiting: int = 64  # requests queued behind the one generating; more get 503


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    kind = {
        404: "NotFoundError",
        413: "RequestTooLarge",
        500: "InternalServerError",
        503: "ServiceUnavailable",
    }.get(status, "BadRequestError")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read with a byte cap (a huge body is cut off, not buffered)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("client disconnected") from None
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise BadRequest(f"{key}: must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"{key}: must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion(
    body: dict[str, Any], engine: PolicyEngine, limits: ServerLimits
) -> tuple[SamplingParams, int]:
    """Validate a /v1/completions body → (params with every prompt repeated n times, n)."""
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported by this server")
    raw = body.get("prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw)):
        texts = [raw] if isinstance(raw, str) else raw
        prompts = [list(engine.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    elif _is_ids(raw) and raw:
        prompts = [list(raw)]
    elif isinstance(raw, list) and raw and all(_is_ids(p) for p in raw):
        prompts = [list(p) for p in raw]
    else:
        raise BadRequest("prompt: must be token ids (a list of ints), a list of such lists, or text")
    n = _integer(body, "n", 1, 1, limits.max_prompts) or 1
    if len(prompts) * n > limits.max_prompts:
        raise BadRequest(f"prompt: {len(prompts)} prompts x n={n} exceeds the limit of {limits.max_prompts}")
    total = sum(len(p) for p in prompts)
    if total > limits.max_prompt_tokens:
        raise BadRequest(
            f"prompt: {total} tokens exceeds the limit of {limits.max_prompt_tokens} per request"
        )
    for i, p in enumerate(prompts):
        if not p:
            raise BadRequest(f"prompt[{i}]: empty")
        bad = [t for t in p if not 0 <= t < engine.vocab_size]
        if bad:
            raise BadRequest(
                f"prompt[{i}]: token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}"
            )
    max_tokens = _integer(body, "max_tokens", 16, 1, limits.max_tokens) or 16
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > engine.max_context:
        raise BadRequest(
            f"This model's maximum context length is {engine.max_context} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion)."
        )
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > limits.max_stop
    ):
        raise BadRequest(f"stop: must be a string or a list of at most {limits.max_stop} non-empty strings")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise BadRequest("model: must be a string")
    params = SamplingParams(
        prompts=[p for p in prompts for _ in range(n)],
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        stop=tuple(stop),
        model=model,
    )
    _integer(body, "logprobs", 0, 0, 20)
    return params, n


def completion_reply(
    engine: PolicyEngine, body: dict[str, Any], params: SamplingParams, done: list[Completion]
) -> dict[str, Any]:
    """vLLM-shaped /v1/completions reply for the engine's samples."""
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    keep_stop = bool(body.get("include_stop_str_in_output"))
    want_lp = body.get("logprobs") is not None
    choices = []
    for i, c in enumerate(done):
        s = c.sample
        text = engine.tokenizer.decode(
            s.token_ids, skip_special_tokens=bool(body.get("skip_special_tokens", True))
        )
        hits = [(text.find(st), st) for st in params.stop if st in text]
        stop_reason = min(hits)[1] if hits else None
        if stop_reason is not None:  # like vLLM: the text ends at the stop string; every sampled id is kept
            cut = text.find(stop_reason)
            text = text[: cut + (len(stop_reason) if keep_stop else 0)]
        eos = bool(s.token_ids) and s.token_ids[-1] in engine.policy.eos_ids
        choice: dict[str, Any] = {
            "index": i,
            "text": text,
            "token_ids": list(s.token_ids),
            "finish_reason": "stop" if stop_reason or eos else "length",
            "stop_reason": stop_reason,
        }
        if want_lp:
            toks = [f"token_id:{t}" if as_ids else engine.tokenizer.decode([t]) for t in s.token_ids]
            choice["logprobs"] = {
                "tokens": toks,
                "token_logprobs": list(s.logprobs),
                "top_logprobs": [{t: lp} for t, lp in zip(toks, s.logprobs, strict=True)],
                "text_offset": [],
            }
        choices.append(choice)
    prompt_tokens = sum(c.prompt_tokens for c in done)
    completion_tokens = sum(len(c.sample.token_ids) for c in done)
    return {
        "id": f"cmpl-{time.monotonic_ns():x}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": params.model or engine.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in done)},
        },
        "treegrpo_version": done[0].version if done else engine.version_for(params.model),
    }


def build_app(engine: PolicyEngine, limits: ServerLimits | None = None) -> Starlette:
    """The starlette app serving `engine` under `limits`."""
    lim = limits or ServerLimits()
    waiting = {"n": 0}
    gate = threading.Lock()

    async def guarded(fn: Callable[[Request], Any], request: Request) -> JSONResponse:
        try:
            return await fn(request)
        except BadRequest as e:
            return _error(str(e), e.status)
        except EngineError as e:
            return _error(str(e), e.status)
        except Exception as e:  # noqa: BLE001 - the server stays up; the client gets a JSON 500
            log.exception("request to %s failed", request.url.path)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return _error(f"internal error: {type(e).__name__}: {first}", 500)

    async def completions(request: Request) -> JSONResponse:
        body = await _json_body(request, lim.max_body_bytes)
        params, _ = parse_completion(body, engine, lim)
        engine.version_for(params.model)  # 404 for an unknown adapter before queueing
        with gate:
            if waiting["n"] > lim.max_waiting:
                raise BadRequest(f"server busy: more than {lim.max_waiting} requests waiting", 503)
            waiting["n"] += 1
        try:
            done = await run_in_threadpool(engine.generate, params)
        finally:
            with gate:
                waiting["n"] -= 1
        return JSONResponse(completion_reply(engine, body, params, done))

    async def models(request: Request) -> JSONResponse:
        data = [{"id": n, "object": "model", "owned_by": "treegrpo"} for n in engine.served_names()]
        return JSONResponse({"object": "list", "data": data})

    def _field(body: dict[str, Any], key: str) -> str:
        v = body.get(key)
        if not isinstance(v, str) or not v:
            raise BadRequest(f"{key}: required (a non-empty string)")
        return v

    async def load_lora(request: Request) -> JSONResponse:
        body = await _json_body(request, lim.max_body_bytes)
        name, path = _field(body, "lora_name"), _field(body, "lora_path")
        version = await run_in_threadpool(engine.load_adapter, name, path)
        return JSONResponse({"status": "ok", "lora_name": name, "version": version})

    async def unload_lora(request: Request) -> JSONResponse:
        body = await _json_body(request, lim.max_body_bytes)
        name = _field(body, "lora_name")
        await run_in_threadpool(engine.unload_adapter, name)
        return JSONResponse({"status": "ok", "lora_name": name})

    async def reload_weights(request: Request) -> JSONResponse:
        body = await _json_body(request, lim.max_body_bytes)
        path = _field(body, "path")
        version = _integer(body, "version", None, 0, 2**62)
        new = await run_in_threadpool(engine.reload_weights, path, version)
        return JSONResponse({"status": "ok", "version": new})

    async def reset_prefix_cache(request: Request) -> JSONResponse:
        await run_in_threadpool(engine.reset_prefix_cache)
        return JSONResponse({"status": "ok"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(engine.health())

    def route(path: str, fn: Callable[[Request], Any], method: str) -> Route:
        async def endpoint(request: Request) -> JSONResponse:
            return await guarded(fn, request)

        return Route(path, endpoint, methods=[method])

    return Starlette(
        routes=[
            route("/v1/completions", completions, "POST"),
            route("/v1/models", models, "GET"),
            route("/v1/load_lora_adapter", load_lora, "POST"),
            route("/v1/unload_lora_adapter", unload_lora, "POST"),
            route("/reload_weights", reload_weights, "POST"),
            route("/reset_prefix_cache", reset_prefix_cache, "POST"),
            route("/health", health, "GET"),
        ]
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = any free port); passing it to uvicorn tells us the real port."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        from treegrpo.errors import UserError

        raise UserError(f"--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def _uvicorn_server(app: Starlette, limits: ServerLimits) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        # A last line of defence (plain-text 503): our own queue bound answers with a JSON 503 well before.
        limit_concurrency=max(256, 4 * limits.max_waiting),
        timeout_keep_alive=30,
    )
    return uvicorn.Server(config)


def serve(
    engine: PolicyEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until interrupted; announces the bound URL (useful with port 0)."""
    lim = limits or ServerLimits()
    sock = bind(host, port)
    real = sock.getsockname()[1]
    announce(f"serving {engine.name} (version {engine.version}) on http://{host}:{real}/v1 (Ctrl-C to stop)")
    _uvicorn_server(build_app(engine, lim), lim).run(sockets=[sock])


class BackgroundServer:
    """A policy server on a thread of this process, on 127.0.0.1 and a free port (tests, benchmarks)."""

    def __init__(
        self, engine: PolicyEngine, limits: ServerLimits | None = None, host: str = "127.0.0.1"
    ) -> None:
        lim = limits or ServerLimits()
        self.engine = engine
        self._sock = bind(host, 0)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = _uvicorn_server(build_app(engine, lim), lim)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("policy server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def engine_for_config(cfg: Any, checkpoint: str | None = None, **engine_kwargs: Any) -> PolicyEngine:
    """The model `train` would build from `cfg` (or a checkpoint of it), as a `PolicyEngine`."""
    from treegrpo.commands import model_for_cli  # the same model assembly as `eval` and `train`
    from treegrpo.policy_engine import checkpoint_step

    parts, ckpt = model_for_cli(cfg, checkpoint)
    step = checkpoint_step(ckpt) if ckpt is not None else None
    return PolicyEngine(
        parts.model,
        parts.tokenizer,
        name=cfg.policy.api_model or cfg.name,
        version=step or 0,
        **engine_kwargs,
    )


def serve_policy_cli(
    cfg: Any,
    checkpoint: str | None,
    host: str,
    port: int,
    limits: ServerLimits | None = None,
    prefix_cache_tokens: int | None = None,
    max_batch_rows: int | None = None,
) -> None:
    """`treegrpo serve-policy`: the model `train` would build (same config resolution), optionally a checkpoint."""
    from treegrpo.errors import UserError

    if prefix_cache_tokens is not None and prefix_cache_tokens < 0:
        raise UserError(f"--prefix-cache-tokens: must be >= 0, got {prefix_cache_tokens}")
    if max_batch_rows is not None and max_batch_rows < 1:
        raise UserError(f"--max-batch-rows: must be >= 1, got {max_batch_rows}")
    kw: dict[str, Any] = {}
    if prefix_cache_tokens is not None:
        kw["prefix_cache_tokens"] = prefix_cache_tokens
    if max_batch_rows is not None:
        kw["max_batch_rows"] = max_batch_rows
    serve(engine_for_config(cfg, checkpoint, **kw), host=host, port=port, limits=limits)
