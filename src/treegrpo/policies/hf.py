"""A `Policy` on Hugging Face transformers: token ids in, token ids out, with a prefix KV cache.

Sampling is our own loop over `model(...)`: every row of a batch keeps its real positions (explicit
`position_ids`) and an explicit additive 4D mask, so rows may start from cached prefixes of different
lengths. The KV lives in per-layer buffers preallocated for the whole batch (a decode step writes one slot
in place instead of re-concatenating the cache), the decode mask is one preallocated column per slot, and
rows that finished are compacted out of the batch. When rows finish, the KV of `context + generated[:-1]`
is gathered (a few indexing ops per batch, not per row) into a small LRU prefix cache keyed by token ids;
the next step of the branch (context + step + observation) and every later expansion of a node (its full
context) re-use it and prefill only the new tokens.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from treegrpo.protocols import Prompt, StepSample, triage_contexts

DEFAULT_STOP = ("</search>", "</answer>")
SMALL_MODEL_PARAMS = 20_000_000  # below this, CPU generation runs single-threaded unless told otherwise


@dataclass(eq=False)
class KVBlock:
    """Packed KV of stored sequences: per layer (keys, values), each (tokens, kv_heads, head_dim).

    The finished rows of a batch are gathered into a block with one indexing op per tensor (not one copy per
    row); cache entries are (block, offset) slices of it. The block's memory lives while any entry points into
    it, so the cache counts its whole size until the last such entry goes.
    """

    kv: list[tuple[Tensor, Tensor]]
    size: int
    refs: int = 0


class PrefixCache:
    """LRU map token-id sequence → KV slice of a `KVBlock`, bounded by the tokens of the blocks it keeps alive.

    Lookup returns the longest common prefix with any entry. An entry that is a prefix of a new one is
    dropped (the longer entry serves it too).
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[np.ndarray, KVBlock, int]] = OrderedDict()
        self._next = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def lookup(self, ids: np.ndarray) -> tuple[int, tuple[KVBlock, int] | None]:
        """(length of the longest cached prefix of `ids`, (block, offset) holding its KV) or (0, None)."""
        best, best_key = 0, None
        for key, (arr, _, _) in self._entries.items():
            n = min(len(arr), len(ids))
            if n <= best or arr[0] != ids[0]:
                continue
            diff = np.flatnonzero(arr[:n] != ids[:n])
            lcp = int(diff[0]) if diff.size else n
            if lcp > best:
                best, best_key = lcp, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        _, block, offset = self._entries[best_key]
        return best, (block, offset)

    def store(self, ids: np.ndarray, block: KVBlock, offset: int) -> None:
        """Remember that `block` rows offset .. offset + len(ids) hold the KV of `ids`."""
        if self.max_tokens <= 0 or len(ids) == 0 or len(ids) > self.max_tokens:
            return
        for key, (arr, _, _) in list(self._entries.items()):
            if arr[0] != ids[0]:
                continue
            if len(arr) >= len(ids) and np.array_equal(arr[: len(ids)], ids):
                self._entries.move_to_end(key)
                return  # already covered by a longer entry
            if len(arr) < len(ids) and np.array_equal(ids[: len(arr)], arr):
                self._drop(key)
        self._entries[self._next] = (ids.copy(), block, offset)
        self._next += 1
        block.refs += 1
        if block.refs == 1:
            self.tokens += block.size
        while self.tokens > self.max_tokens and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        _, block, _ = self._entries.pop(key)
        block.refs -= 1
        if block.refs == 0:
            self.tokens -= block.size


class _SlabLayer(DynamicLayer):
    """One layer's KV in a buffer preallocated for the whole batch (rows, kv_heads, capacity, head_dim).

    Appending a decode step writes one slot in place instead of `torch.cat`-ing the whole cache; the model
    sees views of the filled part.
    """

    def __init__(
        self, capacity: int, keys: Tensor | None = None, values: Tensor | None = None, length: int = 0
    ) -> None:
        super().__init__()
        self.capacity = capacity
        self.k_buf, self.v_buf, self.length = keys, values, length
        if keys is not None:
            self.is_initialized = True
            self.device = keys.device
            self._views()

    def _views(self) -> None:
        assert self.k_buf is not None and self.v_buf is not None
        self.keys = self.k_buf[:, :, : self.length]
        self.values = self.v_buf[:, :, : self.length]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.k_buf is None or self.v_buf is None:
            r, h, _, d = key_states.shape
            self.k_buf = key_states.new_zeros((r, h, self.capacity, d))
            self.v_buf = value_states.new_zeros(
                (r, value_states.shape[1], self.capacity, value_states.shape[-1])
            )
            self.is_initialized = True
            self.device = key_states.device
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV slab overflow: {end} slots > capacity {self.capacity}")
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, idx: Tensor) -> None:
        """Keep only batch rows `idx` (drops finished rows so later steps compute less)."""
        assert self.k_buf is not None and self.v_buf is not None
        self.k_buf, self.v_buf = (self._select(b, idx) for b in (self.k_buf, self.v_buf))
        self._views()

    def _select(self, buf: Tensor, idx: Tensor) -> Tensor:
        # Only filled slots are copied: later slots are always written before anything reads them.
        out = buf.new_empty((len(idx), *buf.shape[1:]))
        out[:, :, : self.length] = buf[idx, :, : self.length]
        return out


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
        cpu_threads: int | None = None,
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
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or None, got {cpu_threads}")
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
        self._stop_ids: dict[tuple[str, ...], np.ndarray] = {}
        self._n_layers = self._num_layers()
        # Decoding a small model is a long chain of tiny ops: on CPU, intra-op threads only add sync waits
        # (badly so when other processes hold the cores), so by default such models generate on one thread.
        n_params = sum(p.numel() for p in model.parameters())
        self.cpu_threads = (
            cpu_threads if cpu_threads is not None else (1 if n_params < SMALL_MODEL_PARAMS else None)
        )
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

    def generate(
        self, contexts: Sequence[Sequence[int]], stop: Sequence[str] | None = None
    ) -> list[StepSample]:
        """Continue every context by one step; stops at a stop string, EOS, max_new_tokens or max_context.

        `stop` (an environment's `stop_strings`) replaces the policy's own stop strings for this call.
        """
        self._check_weights()
        stops = self.stop_strings if stop is None else tuple(str(s) for s in stop if s)
        out, work = triage_contexts(contexts, self.max_context, self._vocab_size())
        bs = self.batch_size or max(len(work), 1)
        was_training = self.model.training
        threads = torch.get_num_threads()
        if self.cpu_threads is not None and self.device.type == "cpu" and self.cpu_threads != threads:
            torch.set_num_threads(self.cpu_threads)
        self.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(work), bs):
                    idx = work[s : s + bs]
                    for i, sample in zip(
                        idx, self._generate_batch([list(contexts[i]) for i in idx], stops), strict=True
                    ):
                        out[i] = sample
        finally:
            self.model.train(was_training)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
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

    def _forward(self, ids: Tensor, pos: Tensor, mask: Tensor, cache: DynamicCache) -> Tensor:
        """One forward of q new slots under an additive (R, 1, q, slots) mask; last-position logits in fp32."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _new_cache(self, layers: list[_SlabLayer]) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        cache.layers = list(layers)
        return cache

    def _num_layers(self) -> int:
        n = len(DynamicCache(config=self.model.config).layers)
        return n or int(self.model.config.get_text_config(decoder=True).num_hidden_layers)

    def _generate_batch(self, ctxs: list[list[int]], stops: tuple[str, ...]) -> list[StepSample]:
        dev = self.device
        r = len(ctxs)
        arrs = [np.asarray(c, dtype=np.int64) for c in ctxs]
        hits = [self.cache.lookup(a) for a in arrs]
        reuse = [min(m, len(a) - 1) for (m, _), a in zip(hits, arrs, strict=True)]
        past_len = max(reuse)
        suffix = [len(a) - m for a, m in zip(arrs, reuse, strict=True)]
        new_len = max(suffix)
        budget = [min(self.max_new_tokens, self.max_context - len(a)) for a in arrs]
        # Slots: [pad | cached prefix] [pad | uncached suffix] [one per decode step]; real positions stay exact.
        capacity = past_len + new_len + max(budget)
        self.stats["cached_tokens"] += sum(reuse)
        self.stats["prefill_tokens"] += sum(suffix)

        allow = np.zeros((r, capacity), dtype=bool)
        ids_np = np.full((r, new_len), self.pad_id, dtype=np.int64)
        pos_np = np.zeros((r, new_len), dtype=np.int64)
        for i, (a, m, s) in enumerate(zip(arrs, reuse, suffix, strict=True)):
            allow[i, past_len - m : past_len] = True
            allow[i, past_len + new_len - s : past_len + new_len] = True
            ids_np[i, new_len - s :] = a[m:]
            pos_np[i, new_len - s :] = np.arange(m, len(a))
        allow_t = torch.from_numpy(allow).to(dev)
        neg = torch.finfo(self.dtype).min
        # Decode-time additive mask, one column per slot: a step only opens its own column.
        dmask = torch.zeros((r, capacity), dtype=self.dtype, device=dev).masked_fill_(~allow_t, neg)
        cache = self._new_cache(self._past_layers(hits, reuse, past_len, capacity))

        big = past_len + new_len
        causal = torch.ones(new_len, big, dtype=torch.bool, device=dev).tril(past_len)
        allowed = causal[None] & allow_t[:, None, :big]
        diag = torch.arange(new_len, device=dev)
        allowed[:, diag, past_len + diag] = True  # every query sees itself: no fully-masked rows
        pmask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, neg)[:, None]
        logits = self._forward(
            torch.from_numpy(ids_np).to(dev), torch.from_numpy(pos_np).to(dev), pmask, cache
        )
        del allowed, pmask, causal

        length = big  # slots filled so far
        next_pos = torch.tensor([len(a) for a in arrs], dtype=torch.long, device=dev)
        rows = list(range(r))  # slab row -> batch row (finished rows are compacted away)
        active = torch.ones(r, dtype=torch.bool, device=dev)
        gen: list[list[int]] = [[] for _ in range(r)]
        lps: list[list[float]] = [[] for _ in range(r)]
        ents: list[list[float]] = [[] for _ in range(r)]
        done = [False] * r
        pending: list[tuple[int, int]] = []  # (batch row, slab row) finished, KV not yet stored
        n_active = r
        stop_ids = self._stop_candidates(logits.shape[-1], stops) if stops else None
        window = max([16, *(len(x) + 2 for x in stops)])
        while True:
            tok, lp, ent = self._sample(logits)
            tok_l, lp_l, ent_l = tok.tolist(), lp.tolist(), ent.tolist()
            finished: list[int] = []
            for j, i in enumerate(rows):
                if done[i]:
                    continue
                t = tok_l[j]
                g = gen[i]
                g.append(t)
                lps[i].append(lp_l[j])
                ents[i].append(ent_l[j])
                if (
                    t in self.eos_ids
                    or len(g) >= budget[i]
                    or (stop_ids is not None and stop_ids[t] and self._hit_stop(g, stops, window))
                ):
                    done[i] = True
                    finished.append(j)
                    pending.append((i, j))
            n_active -= len(finished)
            if n_active == 0:
                break
            if finished:
                active[finished] = False
                if 4 * n_active <= 3 * len(rows):
                    # Most rows are done: store their KV, then shrink the batch to the live rows.
                    self._flush(pending, arrs, gen, reuse, suffix, past_len, new_len, cache)
                    pending = []
                    keep = [j for j, i in enumerate(rows) if not done[i]]
                    idx = torch.tensor(keep, dtype=torch.long, device=dev)
                    for layer in cache.layers:
                        layer.select_rows(idx)  # type: ignore[attr-defined]
                    dmask, next_pos, tok = dmask[idx], next_pos[idx], tok[idx]
                    rows = [rows[j] for j in keep]
                    active = torch.ones(len(rows), dtype=torch.bool, device=dev)
            feed = torch.where(active, tok, self.pad_id)[:, None]
            dmask[:, length].masked_fill_(active, 0.0)
            length += 1
            logits = self._forward(feed, next_pos[:, None], dmask[:, None, None, :length], cache)
            next_pos += active
        self._flush(pending, arrs, gen, reuse, suffix, past_len, new_len, cache)
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

    def _past_layers(
        self,
        hits: list[tuple[int, tuple[KVBlock, int] | None]],
        reuse: list[int],
        past_len: int,
        capacity: int,
    ) -> list[_SlabLayer]:
        """Slab layers pre-filled with each row's cached prefix (right-aligned at `past_len`), one copy per block."""
        groups: dict[int, tuple[KVBlock, list[tuple[int, int, int]]]] = {}
        for i, ((_, ref), m) in enumerate(zip(hits, reuse, strict=True)):
            if ref is not None and m > 0:
                groups.setdefault(id(ref[0]), (ref[0], []))[1].append((i, ref[1], m))
        if not groups:
            return [_SlabLayer(capacity) for _ in range(self._n_layers)]
        r = len(hits)
        first = next(iter(groups.values()))[0].kv
        bufs = [
            tuple(t.new_zeros((r, t.shape[1], capacity, t.shape[2])) for t in layer_kv) for layer_kv in first
        ]
        for block, items in groups.values():
            src = np.concatenate([np.arange(off, off + m) for _, off, m in items])
            dst_row = np.concatenate([np.full(m, i) for i, _, m in items])
            dst_slot = np.concatenate([np.arange(past_len - m, past_len) for _, _, m in items])
            src_t, row_t, slot_t = (torch.from_numpy(x).to(self.device) for x in (src, dst_row, dst_slot))
            for (kb, vb), (k, v) in zip(bufs, block.kv, strict=True):
                kb[row_t, :, slot_t] = k[src_t]
                vb[row_t, :, slot_t] = v[src_t]
        return [_SlabLayer(capacity, kb, vb, past_len) for kb, vb in bufs]

    def _flush(
        self,
        pending: list[tuple[int, int]],
        arrs: list[np.ndarray],
        gen: list[list[int]],
        reuse: list[int],
        suffix: list[int],
        past_len: int,
        new_len: int,
        cache: DynamicCache,
    ) -> None:
        """Store the KV of context + generated[:-1] (everything fed) of finished rows, in blocks of a few rows."""
        limit = self.cache.max_tokens
        if limit <= 0 or not pending:
            return
        todo = [(i, j) for i, j in pending if len(arrs[i]) + len(gen[i]) - 1 <= limit]
        chunk_cap = max(limit // 4, 1)
        while todo:
            chunk, size = [], 0
            while todo and (
                not chunk or size + len(arrs[todo[0][0]]) + len(gen[todo[0][0]]) - 1 <= chunk_cap
            ):
                i, j = todo.pop(0)
                chunk.append((i, j))
                size += len(arrs[i]) + len(gen[i]) - 1
            rows_np, slots_np = [], []
            for i, j in chunk:
                m, s, g = reuse[i], suffix[i], len(gen[i]) - 1
                slots = np.concatenate(
                    [
                        np.arange(past_len - m, past_len),
                        np.arange(past_len + new_len - s, past_len + new_len + g),
                    ]
                )
                slots_np.append(slots)
                rows_np.append(np.full(len(slots), j))
            row_t = torch.from_numpy(np.concatenate(rows_np)).to(self.device)
            slot_t = torch.from_numpy(np.concatenate(slots_np)).to(self.device)
            kv = [(layer.k_buf[row_t, :, slot_t], layer.v_buf[row_t, :, slot_t]) for layer in cache.layers]  # type: ignore[attr-defined]
            block = KVBlock(kv=kv, size=size)
            off = 0
            for (i, _), slots in zip(chunk, slots_np, strict=True):
                ids = np.concatenate([arrs[i], np.asarray(gen[i][:-1], dtype=np.int64)])
                self.cache.store(ids, block, off)
                off += len(slots)

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

    def _hit_stop(self, gen: list[int], stops: tuple[str, ...], window: int) -> bool:
        """Did the newest token complete a stop string? (Decodes only a tail window of the new ids.)"""
        tail = self.tokenizer.decode(gen[-window:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    def _stop_candidates(self, vocab: int, stops: tuple[str, ...]) -> np.ndarray:
        """Token ids whose text can end a stop string (only those need the decoded tail checked).

        A stop string completed by the newest token ends inside that token's text, so the token's own decoding
        holds the stop string's last character (or an undecodable fragment, kept to be safe). Cached per set
        of stop strings (one per environment in practice).
        """
        cand = self._stop_ids.get(stops)
        if cand is None or len(cand) != vocab:
            n = min(vocab, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[t] for t in range(n)], skip_special_tokens=False)
            ends = {s[-1] for s in stops if s} | {"\ufffd"}
            cand = np.ones(vocab, dtype=bool)
            cand[:n] = [any(c in txt for c in ends) for txt in texts]
            self._stop_ids[stops] = cand
        return cand


def load_hf_policy(path: str | Path, **kwargs: Any) -> HFPolicy:
    """HFPolicy for a saved model directory (model and tokenizer from the same path)."""
    return HFPolicy(path, None, **kwargs)
