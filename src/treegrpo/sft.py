"""Supervised warm start on demonstrations, on exactly the token sequences the agent sees at RL time.

Why exact: the RL policy continues contexts built as prompt ids (chat template) + each step's ids +
each observation's ids tokenized on its own (SPEC §2). Training the warm start on a re-tokenized string
of the whole dialogue would teach token boundaries the sampler never produces. So each demonstration is
replayed through the real environment (observations come from the real retriever), and the loss is a
next-token loss on the step tokens only: prompt and observation tokens are context, never targets.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from treegrpo.protocols import Environment, Prompt


@dataclass
class SFTExample:
    """One demonstration as ids: `loss_mask` is 1 on step tokens, 0 on prompt and observations."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    group_id: str = ""
    n_steps: int = 0
    reward: float | None = None  # the environment's reward of the replayed demonstration


@dataclass
class SFTStats:
    """What the warm start did (all losses are token-means over step tokens)."""

    examples: int
    steps: int
    epochs: int
    trained_tokens: int  # loss tokens per epoch
    total_tokens: int  # all tokens per epoch (context included)
    loss_before: float
    loss_after: float
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    skipped: int = 0  # demonstrations dropped (too long for max_length)
    demo_reward_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _steps_of(demo: Any) -> tuple[Mapping[str, Any], list[str]]:
    """Accept Demonstration objects, {"row", "steps"} mappings or (row, steps) pairs."""
    if isinstance(demo, Mapping):
        row, steps = demo.get("row"), demo.get("steps")
    elif isinstance(demo, tuple) and len(demo) == 2:
        row, steps = demo
    else:
        row, steps = getattr(demo, "row", None), getattr(demo, "steps", None)
    if not isinstance(row, Mapping) or not isinstance(steps, list) or not steps:
        raise ValueError("each demonstration needs a row (mapping) and a non-empty list of step texts")
    if not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"demonstration {row.get('group_id', '?')}: steps must be non-empty strings")
    return row, steps


def _ids(out: Any) -> list[int]:
    """A tokenizer's output as a flat id list (lists, BatchEncoding / dicts, or tokenizers' Encoding)."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    out = getattr(out, "ids", out)
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def default_encoders(tokenizer: Any) -> tuple[Callable[[Prompt], list[int]], Callable[[str], list[int]]]:
    """Prompt → ids via the chat template (generation prompt added); text → ids with no specials."""

    def encode_prompt(prompt: Prompt) -> list[int]:
        if prompt and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]  # type: ignore[arg-type]
        return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))

    def encode_text(text: str) -> list[int]:
        return _ids(tokenizer.encode(text, add_special_tokens=False))

    return encode_prompt, encode_text


@dataclass
class ReplayedStep:
    """One demonstration step as the environment answered it."""

    text: str
    observation: str
    done: bool


@dataclass
class Replay:
    """A demonstration replayed through an environment: its prompt, accepted steps and reward."""

    row: Mapping[str, Any]
    prompt: Prompt
    steps: list[ReplayedStep] = field(default_factory=list)
    reward: float | None = None


def replay(env: Environment, demonstrations: Sequence[Any]) -> list[Replay]:
    """Step each demonstration through `env` (batched across demos); observations are the env's own.

    A demo that the environment ends early (e.g. out of turns) keeps only the steps it accepted.
    """
    if not demonstrations:
        raise ValueError("no demonstrations to replay")
    parsed = [_steps_of(d) for d in demonstrations]
    states: list[Any] = []
    out: list[Replay] = []
    for row, _steps in parsed:
        try:
            state, prompt = env.start(row)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"demonstration {row.get('group_id', row.get('index', '?'))}: {e}") from None
        states.append(state)
        out.append(Replay(row, prompt))
    active = list(range(len(parsed)))
    k = 0
    while active:
        acts = [parsed[i][1][k] for i in active]
        results = env.step([states[i] for i in active], acts)
        still = []
        for i, text, res in zip(active, acts, results, strict=True):
            out[i].steps.append(ReplayedStep(text, res.observation or "", bool(res.done)))
            states[i] = res.state
            if res.done:
                out[i].reward = float(env.reward(res.state))
            elif k + 1 < len(parsed[i][1]):
                still.append(i)
        active = still
        k += 1
    return out


def build_sft_examples(
    tokenizer: Any,
    env: Environment,
    demonstrations: Sequence[Any],
    encode_prompt: Callable[[Prompt], list[int]] | None = None,
    encode_observation: Callable[[str], list[int]] | None = None,
    encode_step: Callable[[str], list[int]] | None = None,
) -> list[SFTExample]:
    """Replay each demonstration through `env` and lay out its ids exactly as RL would see them.

    Pass the policy's own `encode_prompt` / `encode_observation` to guarantee the ids match RL time;
    the defaults use the tokenizer's chat template and plain encoding.
    """
    if not demonstrations:
        raise ValueError("no demonstrations to build SFT examples from")
    enc_prompt, enc_text = default_encoders(tokenizer)
    encode_prompt = encode_prompt or enc_prompt
    encode_observation = encode_observation or enc_text
    encode_step = encode_step or enc_text
    examples: list[SFTExample] = []
    for n, rep in enumerate(replay(env, demonstrations)):
        ids = list(encode_prompt(rep.prompt))
        gid = str(rep.row.get("group_id", rep.row.get("index", n)))
        ex = SFTExample(ids, [0] * len(ids), len(ids), gid, len(rep.steps), rep.reward)
        for st in rep.steps:
            step_ids = encode_step(st.text)
            ex.input_ids += step_ids
            ex.loss_mask += [1] * len(step_ids)
            if st.observation:
                obs_ids = encode_observation(st.observation)
                ex.input_ids += obs_ids
                ex.loss_mask += [0] * len(obs_ids)
        examples.append(ex)
    return examples


def _batches(examples: Sequence[SFTExample], batch_size: int, pad_id: int, device: torch.device):
    """Right-padded (ids, attention mask, loss mask) tensors."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        lm = torch.zeros((len(chunk), width), dtype=torch.float32)
        for r, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids)
            att[r, :n] = 1
            lm[r, :n] = torch.tensor(e.loss_mask, dtype=torch.float32)
        yield ids.to(device), att.to(device), lm.to(device)


def _loss_sums(
    model: Any, ids: torch.Tensor, att: torch.Tensor, lm: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Sum of next-token NLL over loss-mask tokens (a token's target comes from the previous position)."""
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    targets = ids[:, 1:]
    mask = lm[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )
    return (nll * mask.reshape(-1)).sum(), float(mask.sum())


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def sft_loss(model: Any, examples: Sequence[SFTExample], batch_size: int = 16, pad_id: int = 0) -> float:
    """Token-mean masked NLL of `model` on `examples` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for ids, att, lm in _batches(examples, batch_size, pad_id, _device(model)):
        s, c = _loss_sums(model, ids, att, lm)
        total += float(s)
        count += c
    model.train(was_training)
    return total / max(count, 1.0)


def sft_train(
    model: Any,
    examples: Sequence[SFTExample],
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    warmup_steps: int = 0,
    max_length: int | None = None,
    pad_id: int = 0,
    max_seconds: float | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> SFTStats:
    """Masked next-token training with AdamW; seeded shuffling; returns before/after losses.

    `on_step(step, total_steps, loss)` lets a caller drive a progress bar. `max_seconds` stops early
    (after the current step) so a warm start fits a wall-clock budget.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    kept = [e for e in examples if max_length is None or len(e.input_ids) <= max_length]
    kept = [e for e in kept if sum(e.loss_mask) > 0]
    if not kept:
        raise ValueError("no SFT example left to train on (all empty or longer than max_length)")
    t0 = time.perf_counter()
    rewards = [e.reward for e in kept if e.reward is not None]
    loss_before = sft_loss(model, kept, batch_size, pad_id)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    per_epoch = math.ceil(len(kept) / batch_size)
    total = per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    rng = random.Random(seed)
    model.train()
    step = 0
    epoch_losses: list[float] = []
    done_epochs = 0
    stop = False
    for _ in range(epochs):
        order = list(kept)
        rng.shuffle(order)
        sum_loss, sum_tok = 0.0, 0.0
        for ids, att, lm in _batches(order, batch_size, pad_id, device):
            s, c = _loss_sums(model, ids, att, lm)
            loss = s / max(c, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            step += 1
            sum_loss += float(s.detach())
            sum_tok += c
            if on_step is not None:
                on_step(step, total, float(loss.detach()))
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stop = True
                break
        epoch_losses.append(sum_loss / max(sum_tok, 1.0))
        done_epochs += 1
        if stop:
            break
    model.eval()
    loss_after = sft_loss(model, kept, batch_size, pad_id)
    return SFTStats(
        examples=len(kept),
        steps=step,
        epochs=done_epochs,
        trained_tokens=sum(sum(e.loss_mask) for e in kept),
        total_tokens=sum(len(e.input_ids) for e in kept),
        loss_before=loss_before,
        loss_after=loss_after,
        epoch_losses=epoch_losses,
        seconds=time.perf_counter() - t0,
        skipped=len(examples) - len(kept),
        demo_reward_mean=sum(rewards) / len(rewards) if rewards else None,
    )


def warm_start(
    model: Any,
    tokenizer: Any,
    env: Environment,
    demonstrations: Sequence[Any],
    encode_prompt: Callable[[Prompt], list[int]] | None = None,
    encode_observation: Callable[[str], list[int]] | None = None,
    **train_kw: Any,
) -> SFTStats:
    """Build the RL-time sequences for `demonstrations` and train `model` on their step tokens."""
    examples = build_sft_examples(tokenizer, env, demonstrations, encode_prompt, encode_observation)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_kw.setdefault("pad_id", int(pad or 0))
    return sft_train(model, examples, **train_kw)


__all__ = [
    "Replay",
    "ReplayedStep",
    "SFTExample",
    "SFTStats",
    "build_sft_examples",
    "default_encoders",
    "replay",
    "sft_loss",
    "sft_train",
    "warm_start",
]
