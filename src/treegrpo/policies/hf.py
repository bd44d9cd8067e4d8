"""A `Policy` on Hugging Face transformers: token ids in, token ids out, with a prefix KV cache.

Sampling is our own loop over `model(...)` with a `DynamicCache`: every row of a batch keeps its real
positions (explicit `position_ids`) and an explicit additive 4D mask, so rows may start from cached
prefixes of different lengths. After each step the KV of `context + generated[:-1]` is kept in a small
LRU prefix cache keyed by token ids; the next step of the branch (context + step + observation) and every
later expansion of a node (its full context) re-use it and prefill only the new tokens.

Reported per-token `logprobs` and `entropies` are of softmax(logits / temperature) over the full
vocabulary (before top-p truncation): exactly what `treegrpo.packing.forward_logprobs(model, batch,
temperature)` recomputes. At the default temperature 1 they are the model's own distribution; greedy mode
reports temperature 1.

The trainer passes the model it trains: generation runs in eval()/no_grad on the live weights and restores
train mode afterwards. Cached KV is dropped automatically when any parameter changed (tensor versions).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from treegrpo.protocols import Prompt, StepSample

DEFAULT_STOP = ("</search>", "</answer>")
KV = list[tuple[Tensor, Tensor]]  # per layer (keys, values), each (1, heads, n, head_dim)


class PrefixCache:
    """LRU map token-id sequence → per-layer KV, bounded by total cached tokens.

    Lookup returns the longest common prefix with any entry. An entry that is a prefix of a new one is
    dropped (the longer entry serves it too).
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[np.ndarray, KV]] = OrderedDict()
        self._next = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def lookup(self, ids: np.ndarray) -> tuple[int, KV | None]:
        best, best_key = 0, None
        for key, (arr, _) in self._entries.items():
            n = min(len(arr), len(ids))
            if n <= best:
                continue
            diff = np.flatnonzero(arr[:n] != ids[:n])
            lcp = int(diff[0]) if diff.size else n
            if lcp > best:
                best, best_key = lcp, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][1]

    def store(self, ids: np.ndarray, kv: KV) -> None:
        if self.max_tokens <= 0 or len(ids) == 0 or len(ids) > self.max_tokens:
            return
        for key, (arr, _) in list(self._entries.items()):
            if len(arr) >= len(ids) and np.array_equal(arr[: len(ids)], ids):
                self._entries.move_to_end(key)
                return  # already covered by a longer entry
            if len(arr) < len(ids) and np.array_equal(ids[: len(arr)], arr):
                del self._entries[key]
                self.tokens -= len(arr)
        self._entries[self._next] = (ids.copy(), kv)
        self._next += 1
        self.tokens += len(ids)
        while self.tokens > self.max_tokens and self._entries:
            _, (arr, _) = self._entries.popitem(last=False)
            self.tokens -= len(arr)


class HFPolicy:
    """Batched token-level sampling from a transformers causal LM (implements `protocols.Policy`)."""

    def __init__(
        self,
        model: PreTrainedModel | str | Path,
        tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        stop_strings: Sequence[str] = DEFAULT_STOP,
        batch_size: int | None = None,
        prefix_cache_tokens: int = 32768,
        max_context: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(model, str | Path):
            tokenizer = tokenizer if tokenizer is not None else str(model)
            model = AutoModelForCausalLM.from_pretrained(str(model))
        if tokenizer is None:
            raise ValueError("tokenizer is required when model is an object")
        if isinstance(tokenizer, str | Path):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.greedy = greedy
        self.stop_strings = tuple(stop_strings)
        self.batch_size = batch_size
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        self.cache = PrefixCache(prefix_cache_tokens)
        self._fingerprint: tuple[Any, ...] | None = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers >= 5.x renamed `past_key_values` to `cache`; older releases only know the former.
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        )
        self._window = max([16, *(len(s) + 2 for s in self.stop_strings)])
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "calls": 0}

    # -- protocol -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Chat messages → ids via the tokenizer's chat template (generation prompt added); ids pass through."""
        if not prompt:
            raise ValueError("prompt is empty")
        if all(isinstance(x, int) for x in prompt):
            return [int(x) for x in prompt]  # type: ignore[arg-type]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ValueError("prompt must be token ids or chat messages with 'role' and 'content'")
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(x) for x in ids]
        # No template: a plain transcript ending with the assistant turn.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "  # type: ignore[index]
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_observation(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def generate(self, contexts: Sequence[Sequence[int]]) -> list[StepSample]:
        """Continue every context by one step; stops at a stop string, EOS, max_new_tokens or max_context."""
        self._check_weights()
        out: list[StepSample | None] = [None] * len(contexts)
        work: list[int] = []
        vocab = self._vocab_size()
        for i, ctx in enumerate(contexts):
            if len(ctx) == 0:
                raise ValueError(f"context {i} is empty")
            bad = [t for t in ctx if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"context {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if len(ctx) >= self.max_context:
                out[i] = StepSample(token_ids=[], logprobs=[], text="", entropies=[], prefill_tokens=0)
            else:
                work.append(i)
        bs = self.batch_size or max(len(work), 1)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(work), bs):
                    idx = work[s : s + bs]
                    for i, sample in zip(
                        idx, self._generate_batch([list(contexts[i]) for i in idx]), strict=True
                    ):
                        out[i] = sample
        finally:
            self.model.train(was_training)
        self.stats["calls"] += 1
        return [o for o in out if o is not None]

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def clear_cache(self) -> None:
        self.cache.clear()

    def _vocab_size(self) -> int:
        emb = self.model.get_output_embeddings()
        return int(emb.weight.shape[0]) if emb is not None else len(self.tokenizer)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list | tuple):
                ids.update(int(x) for x in src)
        return ids

    def _check_weights(self) -> None:
        """Drop cached KV when the weights changed (optimizer steps bump tensor versions)."""
        fp = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if fp != self._fingerprint:
            self.cache.clear()
            self._fingerprint = fp

    def _forward(self, ids: Tensor, pos: Tensor, valid: Tensor, cache: DynamicCache) -> Tensor:
        """One forward of q new slots; `valid` (R, L) marks real slots among all L = past + q slots."""
        r, q = ids.shape
        big = valid.shape[1]
        causal = torch.ones(q, big, dtype=torch.bool, device=valid.device).tril(big - q)
        allowed = causal[None] & valid[:, None, :]
        diag = torch.arange(q, device=valid.device)
        allowed[:, diag, big - q + diag] = True  # every query sees itself: no fully-masked rows
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=valid.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _generate_batch(self, ctxs: list[list[int]]) -> list[StepSample]:
        dev = self.device
        r = len(ctxs)
        arrs = [np.asarray(c, dtype=np.int64) for c in ctxs]
        hits = [self.cache.lookup(a) for a in arrs]
        reuse = [min(m, len(a) - 1) for (m, _), a in zip(hits, arrs, strict=True)]
        past_len = max(reuse)
        suffix = [len(a) - m for a, m in zip(arrs, reuse, strict=True)]
        new_len = max(suffix)
        self.stats["cached_tokens"] += sum(reuse)
        self.stats["prefill_tokens"] += sum(suffix)

        # Layout per row: [pad | cached prefix] [pad | uncached suffix]; real positions stay exact.
        valid = torch.zeros(r, past_len + new_len, dtype=torch.bool, device=dev)
        ids = torch.full((r, new_len), self.pad_id, dtype=torch.long, device=dev)
        pos = torch.zeros((r, new_len), dtype=torch.long, device=dev)
        layers: list[list[Tensor]] | None = None
        for i, (a, m, s) in enumerate(zip(arrs, reuse, suffix, strict=True)):
            valid[i, past_len - m : past_len] = True
            valid[i, past_len + new_len - s :] = True
            ids[i, new_len - s :] = torch.as_tensor(a[m:], device=dev)
            pos[i, new_len - s :] = torch.arange(m, len(a), device=dev)
            kv = hits[i][1]
            if past_len and kv is not None and m > 0:
                if layers is None:
                    layers = [
                        [
                            torch.zeros((r, *t.shape[1:2], past_len, t.shape[-1]), dtype=t.dtype, device=dev)
                            for t in kv_l
                        ]
                        for kv_l in kv
                    ]
                for li, (k, v) in enumerate(kv):
                    layers[li][0][i, :, past_len - m :] = k[0, :, :m]
                    layers[li][1][i, :, past_len - m :] = v[0, :, :m]
        if layers is not None:
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in layers], config=self.model.config)
        else:
            cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, pos, valid, cache)

        next_pos = torch.tensor([len(a) for a in arrs], dtype=torch.long, device=dev)
        budget = [min(self.max_new_tokens, self.max_context - len(a)) for a in arrs]
        gen: list[list[int]] = [[] for _ in range(r)]
        lps: list[list[float]] = [[] for _ in range(r)]
        ents: list[list[float]] = [[] for _ in range(r)]
        done = [False] * r
        while True:
            tok, lp, ent = self._sample(logits)
            tok_l, lp_l, ent_l = tok.tolist(), lp.tolist(), ent.tolist()
            for i in range(r):
                if done[i]:
                    continue
                gen[i].append(tok_l[i])
                lps[i].append(lp_l[i])
                ents[i].append(ent_l[i])
                if tok_l[i] in self.eos_ids or len(gen[i]) >= budget[i] or self._hit_stop(gen[i]):
                    done[i] = True
                    self._store(arrs[i], gen[i], cache, valid, i)
            if all(done):
                break
            active = torch.tensor([not d for d in done], dtype=torch.bool, device=dev)
            feed = torch.where(active, tok, torch.full_like(tok, self.pad_id))[:, None]
            valid = torch.cat([valid, active[:, None]], dim=1)
            logits = self._forward(feed, next_pos[:, None], valid, cache)
            next_pos = next_pos + active.long()
        self.stats["generated_tokens"] += sum(len(g) for g in gen)
        return [
            StepSample(
                token_ids=gen[i],
                logprobs=lps[i],
                text=self.tokenizer.decode(gen[i], skip_special_tokens=True),
                entropies=ents[i],
                prefill_tokens=suffix[i],
            )
            for i in range(r)
        ]

    def _sample(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Next token per row, its log-prob and the entropy (of softmax(logits / temperature))."""
        temp = 1.0 if self.greedy else self.temperature
        logp = torch.log_softmax(logits / temp, dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        if self.greedy:
            tok = logp.argmax(-1)
        else:
            probs = logp.exp()
            if self.top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                keep = (sp.cumsum(-1) - sp) < self.top_p  # always keeps the top token
                sp = sp * keep
                probs = torch.zeros_like(probs).scatter(-1, si, sp)
            tok = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        return tok, logp.gather(-1, tok[:, None])[:, 0], ent

    def _hit_stop(self, gen: list[int]) -> bool:
        """Did the newest token complete a stop string? (Decodes only a tail window of the new ids.)"""
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(gen[-self._window :], skip_special_tokens=False)
        return any(s in tail for s in self.stop_strings)

    def _store(self, ctx: np.ndarray, gen: list[int], cache: DynamicCache, valid: Tensor, row: int) -> None:
        """Keep the KV of context + generated[:-1] (everything fed so far) for this row."""
        if self.cache.max_tokens <= 0:
            return
        keep = valid[row]
        kv: KV = []
        for layer in cache.layers:
            kv.append((layer.keys[row][:, keep][None].clone(), layer.values[row][:, keep][None].clone()))
        ids = np.concatenate([ctx, np.asarray(gen[:-1], dtype=np.int64)])
        if kv and kv[0][0].shape[2] == len(ids):
            self.cache.store(ids, kv)


def load_hf_policy(path: str | Path, **kwargs: Any) -> HFPolicy:
    """HFPolicy for a saved model directory (model and tokenizer from the same path)."""
    return HFPolicy(path, None, **kwargs)
