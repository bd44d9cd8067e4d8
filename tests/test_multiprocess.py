"""Several processes (gloo, CPU) give the same training step as one process on the same global batch.

Through the worker: 2 and 3 processes, one tree much larger than all others, mini-batches smaller than
the step (and not a multiple of the process count, so one rank has an empty mini-batch), gradient
accumulation 2: the run finishes (a hang fails on the timeout), every rank's parameters equal the
single-process run's, and so do the logged metrics and the learning rate.

Through the CLI as users launch it (`torchrun --nproc_per_node 2 -m treegrpo train`): the run finishes,
reports 2 processes, takes as many optimizer steps as one process (same learning rate under warmup), and
evaluates and checkpoints.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_trainer_learns import WORDS, AppleEnv
from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts
from treegrpo.config import load_config
from treegrpo.distributed import DistContext
from treegrpo.models import tiny_causal_lm
from treegrpo.run_log import read_metrics
from treegrpo.tokenizer import train_tokenizer
from treegrpo.trainer import Trainer
from treegrpo.tree import leaf_arrays
from treegrpo.update import attach_advantages

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def _skew(forests) -> None:
    """Make prompt 0's first tree much larger than every other tree (long prompt, long first step)."""
    tree = forests[0].trees[0]
    tree.root.token_ids = tree.root.token_ids * 20
    node = tree.nodes[1]
    node.token_ids, node.logprobs = node.token_ids * 6, node.logprobs * 6


@pytest.mark.parametrize("world", [2, 3])
def test_processes_match_one_process_on_the_same_global_batch(tmp_path: Path, world: int) -> None:
    tok = train_tokenizer([" ".join(WORDS), "name a fruit ok"], kind="wordlevel")
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=3)
    overrides = [
        f"output_dir={tmp_path}",
        "policy.max_new_tokens=4",
        "trainer.prompts_per_step=6",
        "trainer.mini_batch_prompts=4",  # mini-batches of 4 and 2 prompts
        "trainer.gradient_accumulation_steps=2",
        "trainer.beta=0.01",
        "trainer.lr=0.01",
        "trainer.warmup_steps=2",
        "trainer.steps=10",
    ]
    cfg = load_config(None, overrides)
    rows = [{"question": "q", "golden_answers": ["apple"], "group_id": f"g/{i}"} for i in range(12)]
    single = Trainer(
        cfg, RunParts(copy.deepcopy(model), tok, AppleEnv(), rows, []), tmp_path / "one", DistContext()
    )
    forests, _, _ = single.rollout()
    _skew(forests)
    r, g, t = leaf_arrays(forests)
    per_tree = attach_advantages(forests, compute_advantages(np.asarray(r) + np.linspace(0, 1, len(r)), g, t))
    sizes = sorted(sum(len(n.all_ids) for n in tr.nodes) for f in forests for tr in f.trees)
    assert sizes[-1] > 5 * sizes[-2]  # one tree much larger than the rest
    for f in forests:  # environment states are not needed for training and need not pickle
        for tree in f.trees:
            for n in tree.nodes:
                n.state = None
    data = tmp_path / "data.pkl"
    blob = {
        "overrides": overrides,
        "model": model,
        "tokenizer": tok,
        "forests": forests,
        "per_tree_adv": per_tree,
    }
    data.write_bytes(pickle.dumps(blob))
    expected = single.train_on(copy.deepcopy(forests), per_tree)
    assert expected["updates"] == 2

    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, str(HERE / "mp_worker.py"), str(data), str(tmp_path)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        for p in procs:
            log, _ = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, log[-3000:]
    finally:
        for p in procs:
            p.kill()
    ref = single.model.state_dict()
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        m = got["metrics"]
        assert m["updates"] == 2 and got["lr"] == pytest.approx(float(single.scheduler.get_last_lr()[0]))
        # The summed gradient is the single-process gradient (a wrong normalization, e.g. a missing
        # world-size factor, would show here: Adam's update below is nearly scale-invariant).
        assert m["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
        for k in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "ratio_mean", "ratio_max"):
            assert m[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-8), k
        # approx_kl is a mean of (old - new) log-prob differences of ~1e-4: pure cancellation, so the fp32
        # rounding of log-probs (~1e-7 each, batched differently per rank) is its resolution.
        assert m["approx_kl"] == pytest.approx(expected["approx_kl"], abs=1e-7)
        for k, v in got["state"].items():
            # Adam's first step is ~lr * sign(g): rounding noise on near-zero gradients moves weights ~1e-6.
            torch.testing.assert_close(v, ref[k].detach().cpu(), atol=2e-5, rtol=1e-5, msg=k)
    moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in got["state"].items())
    assert moved > 1e-4  # and the steps really moved the weights


def _cli(cfg: Path, name: str, nproc: int, sets: list[str]) -> subprocess.CompletedProcess[str]:
    args = ["-m", "treegrpo", "train", "--config", str(cfg), "--no-progress", "--set", f"name={name}"]
    for s in sets:
        args += ["--set", s]
    if nproc > 1:
        launch = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        args = [*launch, *args]
    return subprocess.run(
        [sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT
    )


def test_torchrun_cli_runs_2_and_3_processes_with_the_one_process_schedule(tiny_config: Path) -> None:
    sets = [
        "trainer.steps=2",
        "trainer.prompts_per_step=6",
        "trainer.mini_batch_prompts=4",  # 4 + 2 prompts: with 3 processes one rank has an empty mini-batch
        "trainer.gradient_accumulation_steps=2",
        "trainer.warmup_steps=2",
        "trainer.lr=1e-4",
        "trainer.eval_every=2",
        "trainer.save_every=0",
    ]
    runs = Path(yaml.safe_load(tiny_config.read_text())["output_dir"])
    done = {}
    for nproc in (1, 2, 3):
        proc = _cli(tiny_config, f"np{nproc}", nproc, sets)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((runs / f"np{nproc}" / "summary.json").read_text())
        assert summary["world_size"] == nproc and summary["steps"] == 2
        done[nproc] = {r["step"]: r for r in read_metrics(runs / f"np{nproc}")}
        assert (runs / f"np{nproc}" / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    one = done[1]
    for nproc in (2, 3):
        m = done[nproc]
        assert sorted(m) == sorted(one) == [0, 1, 2]
        # 2 updates per step, warmup over 2 steps = 4 updates: after step 1 (2 updates) the lr is
        # (2 + 1) / 4 of 1e-4 for every process count. (Before, each of 2 processes took 1 update per
        # step, 2/4 of it.)
        assert m[1]["lr"] == one[1]["lr"] == pytest.approx(0.75e-4)
        assert m[2]["lr"] == one[2]["lr"] == pytest.approx(1e-4)
        # Every rank's prompts were sampled and counted: as many trajectories as one process samples.
        assert m[1]["budget/trajectories"] == one[1]["budget/trajectories"] == 6 * 6
        assert m[2]["eval/n"] == one[2]["eval/n"] == 8  # the held-out set, sharded over the ranks
        assert np.isfinite(m[2]["loss"]) and m[2]["train/ratio_max"] >= 1.0
