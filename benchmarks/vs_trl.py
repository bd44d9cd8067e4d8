"""treegrpo's trainer vs TRL's GRPOTrainer: seconds per trained token and peak memory, same model, same work.

    python benchmarks/vs_trl.py --json

Every system trains the same tiny random Llama (same seed, fp32, CPU, no gradient checkpointing) on the same
prompts (word-level tokenizer, `--prompt-tokens` ids each) with the same loss settings (PPO clip 0.2,
token-mean / TRL "dapo" aggregation, k3 KL to a reference copy with β=0.001, entropy bonus 0.001, AdamW) and the
same trivial reward (the share of completion words ending in an even digit). Each step samples completions of at most
`--completion-tokens` tokens. Systems and the TRL run each is compared with (same sequences per step):

    trl_g4                  TRL GRPOTrainer, num_generations=4, HF generate, use_vllm=False
    trl_g6                  the same with num_generations=6
    treegrpo_chain4         treegrpo, strategy=chain, 4 chains per prompt             vs trl_g4
    treegrpo_tree221        treegrpo, Tree-GRPO (2,2,1) → 6 leaves per prompt          vs trl_g6
    treegrpo_tree221_2step  (2,2,1) with the completion split into two agent steps    vs trl_g6

TRL is single-turn, so treegrpo runs a scripted environment whose episodes are one step of the whole
completion (`chain4`, `tree221`: every sequence is prompt + completion, exactly TRL's shape; a one-step tree
can only branch at the prompt) or two steps of half the completion with an empty observation between them
(`tree221_2step`: the same sequence shape, but leaves may share the first half, which the tree packing trains
once). Trained tokens are counted per sequence (a token shared by k leaves counts k times), so every row's
"seconds per trained token" divides by the work TRL would do for those sequences.

Times: `train` = the update (old/ref log-prob forwards, loss, backward, clip, optimizer step): treegrpo's
`Trainer.train_on`; for TRL the step minus generation and scoring (its no-grad ref forward counted as training).
`e2e` = the whole step including generation (treegrpo: its own batched sampler with a prefix KV cache; TRL: HF
`generate`). Memory: each system runs in its own subprocess; `working_mb` = peak RSS during the steps minus RSS
once the trainer is built (activations, gradients, optimizer state, generation cache), `process_peak_mb` = the
process's ru_maxrss (includes imports). Rounds alternate the systems; figures are medians over all timed steps.
`--quick` is a smoke run (1 round, 32-token prompts and completions, where fixed per-step costs dominate):
do not quote its ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SYSTEMS = ("trl_g4", "trl_g6", "treegrpo_chain4", "treegrpo_tree221", "treegrpo_tree221_2step")
PAIRS = {  # ratio name -> (treegrpo system, TRL system)
    "chain": ("treegrpo_chain4", "trl_g4"),
    "tree": ("treegrpo_tree221", "trl_g6"),
    "tree_2step": ("treegrpo_tree221_2step", "trl_g6"),
}
BETA, ENTROPY_COEFF, EPSILON, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 0.001, 0.001, 0.2, 1e-4, 0.01, 1.0
VOCAB_WORDS = 2000
RESULT_TAG = "VS_TRL_RESULT "


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:
        return False
    return True


# -- shared set-up (identical in every worker) -------------------------------------------------------------
def even_word_fraction(text: str) -> float:
    """The trivial reward both systems use: the share of words ending in an even digit (varies per sample)."""
    words = text.split()
    return sum(w[-1] in "02468" for w in words) / len(words) if words else 0.0


def build_common(args: argparse.Namespace) -> tuple[Any, Any, list[str], list[list[int]]]:
    """Tokenizer, model and prompts (text and ids, exactly `prompt_tokens` ids each) from the seed."""
    import random

    import torch

    from treegrpo.models import tiny_causal_lm
    from treegrpo.tokenizer import train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = train_tokenizer([" ".join(f"w{i}" for i in range(VOCAB_WORDS))], vocab_size=VOCAB_WORDS + 256)
    model = tiny_causal_lm(tok, hidden=args.hidden, layers=args.layers, heads=4, seed=args.seed)
    rng = random.Random(args.seed)
    texts = [
        " ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(args.prompt_tokens))
        for _ in range(args.prompts)
    ]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    for i, x in enumerate(ids):
        if len(x) != args.prompt_tokens:
            raise ValueError(f"prompt {i} tokenizes to {len(x)} ids, expected {args.prompt_tokens}")
    return tok, model, texts, ids


class RssSampler:
    """Peak resident set size while running (a thread polls /proc/self/statm; torch releases the GIL)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# -- treegrpo worker ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _EpisodeState:
    row: int
    turn: int = 0
    text: str = ""
    done: bool = False


class FixedPromptEnv:
    """Scripted environment: the prompt is given ids; `steps` agent steps with empty observations, no tools."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def start(self, row: dict[str, Any]) -> tuple[_EpisodeState, list[int]]:
        return _EpisodeState(int(row["id"])), list(row["prompt_ids"])

    def step(self, states: list[_EpisodeState], actions: list[str]) -> list[Any]:
        from treegrpo.protocols import StepResult
        from treegrpo.tree import ActionKind

        out = []
        for st, act in zip(states, actions, strict=True):
            done = st.turn + 1 >= self.steps
            new = replace(st, turn=st.turn + 1, text=st.text + act, done=done)
            out.append(StepResult(new, "", done, ActionKind.ANSWER if done else ActionKind.SEARCH))
        return out

    def reward(self, state: _EpisodeState) -> float:
        return even_word_fraction(state.text)


def run_treegrpo(system: str, args: argparse.Namespace) -> dict[str, Any]:
    from treegrpo.budget import tree_budget
    from treegrpo.build import RunParts
    from treegrpo.config import Config
    from treegrpo.policies.hf import HFPolicy
    from treegrpo.rollout import RolloutConfig
    from treegrpo.trainer import Trainer

    tok, model, texts, ids = build_common(args)
    steps = 2 if system.endswith("2step") else 1
    step_tokens = args.completion_tokens // steps
    cfg = Config()
    cfg.seed = args.seed
    if system == "treegrpo_chain4":
        cfg.rollout = RolloutConfig(strategy="chain", num_generations=4)
    else:
        cfg.rollout = RolloutConfig(strategy="random", m=2, n=2, l=1)
    cfg.policy.max_new_tokens = step_tokens
    cfg.env.max_turns = steps
    tc = cfg.trainer
    tc.prompts_per_step, tc.lr, tc.weight_decay, tc.max_grad_norm = (
        args.prompts,
        LR,
        WEIGHT_DECAY,
        MAX_GRAD_NORM,
    )
    tc.beta, tc.entropy_coeff, tc.epsilon, tc.epsilon_high = BETA, ENTROPY_COEFF, EPSILON, EPSILON
    tc.loss_agg_mode, tc.packing = "token-mean", "tree"
    rows = [
        {"id": i, "prompt_ids": x, "question": t, "golden_answers": ["-"]}
        for i, (t, x) in enumerate(zip(texts, ids, strict=True))
    ]
    env = FixedPromptEnv(steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunParts(model, tok, env, rows, []), Path(tmp))
        # Sample like TRL: temperature 1, no top-p, stop only at EOS or the length limit.
        trainer.policy = HFPolicy(
            trainer.unwrapped, tok, max_new_tokens=step_tokens, stop_strings=(), seed=args.seed
        )
        record: dict[str, Any] = {}
        inner = trainer.train_on

        def timed_train_on(forests: Any, per_tree_adv: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(forests, per_tree_adv)
            record["train_s"] = time.perf_counter() - t0
            record["forward_tokens"] = (out or {}).get("forward_tokens")
            return out

        trainer.train_on = timed_train_on  # type: ignore[method-assign]
        sampler = RssSampler()
        base = sampler.now()
        out_steps = []
        with sampler:
            for k in range(args.warmup + args.steps):
                record.clear()
                m = trainer.train_step()
                if "train_s" not in record or m.get("train/skipped"):
                    raise RuntimeError(f"{system}: step {k} did not train (all rewards equal?)")
                if k >= args.warmup:
                    loss_tokens = [tree_budget(t) for f in m["_forests"] for t in f.trees]
                    out_steps.append(
                        {
                            "e2e_s": m["time/step_seconds"],
                            "train_s": record["train_s"],
                            "generate_s": m["time/rollout_seconds"],
                            "trained_tokens": sum(b["loss_tokens_total"] for b in loss_tokens),
                            "trained_tokens_unique": sum(b["loss_tokens_unique"] for b in loss_tokens),
                            "generated_tokens": m["budget/generated_tokens"],
                            "sequences": m["budget/trajectories"],
                            "forward_tokens": record["forward_tokens"],
                        }
                    )
    return {"steps": out_steps, "rss_base": base, "rss_peak": sampler.peak}


# -- TRL worker --------------------------------------------------------------------------------------------
def run_trl(system: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    tok, model, texts, _ = build_common(args)
    g = 4 if system == "trl_g4" else 6
    total = args.warmup + args.steps
    record: dict[str, float] = {}
    steps_out: list[dict[str, float]] = []

    class TimedGRPO(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            record["nograd_s"] = 0.0
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            record["gen_score_s"] = time.perf_counter() - t0
            record["trained_tokens"] = float(out["completion_mask"].sum())
            record["generated_tokens"] = float(out["completion_mask"].sum())
            record["sequences"] = float(out["completion_ids"].shape[0])
            record["forward_tokens"] = float(out["prompt_ids"].numel() + out["completion_ids"].numel())
            return out

        def _get_per_token_logps_and_entropies(self, *a: Any, **k: Any) -> Any:
            if torch.is_grad_enabled():
                return super()._get_per_token_logps_and_entropies(*a, **k)
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*a, **k)
            record["nograd_s"] = record.get("nograd_s", 0.0) + time.perf_counter() - t0
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            record["t0"] = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            e2e = time.perf_counter() - record["t0"]
            gen = record["gen_score_s"] - record["nograd_s"]
            steps_out.append(
                {
                    "e2e_s": e2e,
                    "train_s": e2e - gen,
                    "generate_s": gen,
                    "trained_tokens": record["trained_tokens"],
                    "trained_tokens_unique": record["trained_tokens"],
                    "generated_tokens": record["generated_tokens"],
                    "sequences": record["sequences"],
                    "forward_tokens": record["forward_tokens"],
                }
            )

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [even_word_fraction(c) for c in completions]

    data = Dataset.from_list([{"prompt": t} for _ in range(total) for t in texts])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.prompts * g,
            num_generations=g,
            max_completion_length=args.completion_tokens,
            max_steps=total,
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM,
            beta=BETA,
            entropy_coef=ENTROPY_COEFF,
            epsilon=EPSILON,
            loss_type="dapo",  # token-mean over the batch, like treegrpo's default
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            use_vllm=False,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            shuffle_dataset=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1_000_000,  # keep TRL's log lines off stdout
            disable_tqdm=True,
            seed=args.seed,
            dataloader_num_workers=0,
            model_init_kwargs={"dtype": torch.float32},
        )
        # TRL builds its reference model from the policy's path, so hand it a saved copy of the same weights.
        model_dir = Path(tmp) / "model"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        trainer = TimedGRPO(
            model=str(model_dir),
            reward_funcs=reward,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            callbacks=[StepTimer()],
        )
        sampler = RssSampler()
        base = sampler.now()
        with sampler:
            trainer.train()
    if len(steps_out) != total:
        raise RuntimeError(f"{system}: expected {total} steps, TRL ran {len(steps_out)}")
    return {"steps": steps_out[args.warmup :], "rss_base": base, "rss_peak": sampler.peak}


def worker(system: str, args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    out = run_trl(system, args) if system.startswith("trl") else run_treegrpo(system, args)
    out["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out["system"] = system
    return out


# -- driver ------------------------------------------------------------------------------------------------
def worker_args(args: argparse.Namespace) -> list[str]:
    keys = (
        "prompts",
        "prompt_tokens",
        "completion_tokens",
        "hidden",
        "layers",
        "steps",
        "warmup",
        "seed",
        "threads",
    )
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def spawn(system: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, *worker_args(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
    lines = [ln[len(RESULT_TAG) :] for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{system} worker failed (rc {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for r in runs for s in r["steps"]]
    mb = 1024.0 * 1024.0
    out = {
        "timed_steps": len(steps),
        "sequences_per_step": median([s["sequences"] for s in steps]),
        "trained_tokens_per_step": median([s["trained_tokens"] for s in steps]),
        "trained_tokens_unique_per_step": median([s["trained_tokens_unique"] for s in steps]),
        "generated_tokens_per_step": median([s["generated_tokens"] for s in steps]),
        "forward_tokens_per_step": median([s["forward_tokens"] or 0 for s in steps]),
        "train_s_per_step": median([s["train_s"] for s in steps]),
        "e2e_s_per_step": median([s["e2e_s"] for s in steps]),
        "generate_s_per_step": median([s["generate_s"] for s in steps]),
        "train_us_per_trained_token": median([1e6 * s["train_s"] / s["trained_tokens"] for s in steps]),
        "e2e_us_per_trained_token": median([1e6 * s["e2e_s"] / s["trained_tokens"] for s in steps]),
        "working_mb": median([(r["rss_peak"] - r["rss_base"]) / mb for r in runs]),
        "process_peak_mb": median([r["process_peak_rss"] / mb for r in runs]),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    have_trl = trl_available()
    systems = [s for s in SYSTEMS if have_trl or not s.startswith("trl")]
    if args.systems:
        systems = [s for s in systems if s in args.systems]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]  # alternate so drift hits every system alike
        for s in order:
            runs[s].append(spawn(s, args))
    results = {s: summarize(v) for s, v in runs.items()}
    ratios: dict[str, Any] = {}
    for name, (ours, theirs) in PAIRS.items():
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            ratios[name] = {
                "pair": f"{ours} / {theirs}",
                "train_time_per_trained_token": round(
                    a["train_us_per_trained_token"] / b["train_us_per_trained_token"], 4
                ),
                "e2e_time_per_trained_token": round(
                    a["e2e_us_per_trained_token"] / b["e2e_us_per_trained_token"], 4
                ),
                "working_memory": round(a["working_mb"] / b["working_mb"], 4)
                if b["working_mb"] > 0
                else None,
                "process_peak_memory": round(a["process_peak_mb"] / b["process_peak_mb"], 4),
            }
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if have_trl:
        import trl

        versions["trl"] = trl.__version__
    return {
        "setup": {
            "model": f"llama hidden={args.hidden} layers={args.layers} heads=4 vocab≈{VOCAB_WORDS + 256} fp32",
            "prompts_per_step": args.prompts,
            "prompt_tokens": args.prompt_tokens,
            "max_completion_tokens": args.completion_tokens,
            "rounds": args.rounds,
            "timed_steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "torch_threads": args.threads or "default",
            "loss": f"clip {EPSILON}, token-mean (TRL dapo), k3 KL beta={BETA}, entropy {ENTROPY_COEFF}",
            "versions": versions,
        },
        "trl_available": have_trl,
        "skipped": None if have_trl else "trl is not installed (pip install -e '.[bench]'): TRL rows skipped",
        "systems": results,
        "treegrpo_over_trl": ratios,
    }


def table(result: dict[str, Any]) -> str:
    cols = [
        ("sequences_per_step", "seqs"),
        ("trained_tokens_per_step", "trained"),
        ("forward_tokens_per_step", "forwarded"),
        ("train_us_per_trained_token", "train µs/tok"),
        ("e2e_us_per_trained_token", "e2e µs/tok"),
        ("working_mb", "work MB"),
        ("process_peak_mb", "proc MB"),
    ]
    head = f"{'system':<24}" + "".join(f"{label:>13}" for _, label in cols)
    lines = [head, "-" * len(head)]
    for name, r in result["systems"].items():
        lines.append(f"{name:<24}" + "".join(f"{r[k]:>13.2f}" for k, _ in cols))
    if result["skipped"]:
        lines.append(result["skipped"])
    lines.append("")
    lines.append("treegrpo / TRL (≤ 1 is better for treegrpo)")
    for name, r in result["treegrpo_over_trl"].items():
        lines.append(
            f"  {name:<11} {r['pair']:<40} train/tok {r['train_time_per_trained_token']:.3f}  "
            f"e2e/tok {r['e2e_time_per_trained_token']:.3f}  working mem {r['working_memory']}  "
            f"process mem {r['process_peak_memory']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 timed steps, shorter sequences")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--completion-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per system per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first in each worker")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of all systems")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every worker (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", nargs="*", choices=SYSTEMS, help="run only these systems")
    ap.add_argument("--worker-timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 2
        args.prompt_tokens, args.completion_tokens = (
            min(args.prompt_tokens, 32),
            min(args.completion_tokens, 32),
        )
    for name in ("prompts", "prompt_tokens", "steps", "rounds", "hidden", "layers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.completion_tokens < 2:
        ap.error("--completion-tokens must be >= 2 (the two-step tree splits it in halves)")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args.worker, args)))
        return 0
    try:
        result = run(args)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
