"""Two processes (gloo, CPU) each training half of the forests give the same parameters as one process
training all of them: gradients are averaged, losses normalized by global token counts."""

from __future__ import annotations

import copy
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_trainer_learns import WORDS, AppleEnv  # noqa: E402
from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts
from treegrpo.config import load_config
from treegrpo.models import tiny_causal_lm
from treegrpo.tokenizer import train_tokenizer
from treegrpo.trainer import Trainer
from treegrpo.tree import leaf_arrays
from treegrpo.update import attach_advantages

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_match_one(tmp_path: Path, accum: int):
    tok = train_tokenizer([" ".join(WORDS), "name a fruit ok"], kind="wordlevel")
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=3)
    overrides = [
        f"output_dir={tmp_path}",
        "policy.max_new_tokens=4",
        "trainer.prompts_per_step=4",
        "trainer.beta=0.01",
        "trainer.lr=0.01",
        f"trainer.gradient_accumulation_steps={accum}",
    ]
    cfg = load_config(None, overrides)
    rows = [{"question": "q", "golden_answers": ["apple"], "group_id": f"g/{i}"} for i in range(8)]
    single = Trainer(cfg, RunParts(copy.deepcopy(model), tok, AppleEnv(), rows, []), tmp_path / "single")
    forests, _, _ = single.rollout()
    r, g, t = leaf_arrays(forests)
    rewards = np.asarray(r) + np.linspace(0, 1, len(r))  # non-trivial advantages everywhere
    per_tree = attach_advantages(forests, compute_advantages(rewards, g, t))
    for f in forests:  # environment states are not needed for training and need not pickle
        for tree in f.trees:
            for n in tree.nodes:
                n.state = None
    data = tmp_path / "data.pkl"
    data.write_bytes(
        pickle.dumps(
            {
                "overrides": overrides,
                "model": model,
                "tokenizer": tok,
                "forests": forests,
                "per_tree_adv": per_tree,
            }
        )
    )
    expected = single.train_on(forests, per_tree)
    assert expected is not None

    port = _free_port()
    out = tmp_path / "rank0.pt"
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "mp_worker.py"), str(data), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-3000:]
    got = torch.load(out)
    # The synchronized gradient is the single-process gradient (a wrong normalization, e.g. a missing
    # world-size factor, would show here: Adam's update below is nearly scale-invariant).
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    ref = single.unwrapped.state_dict()
    for k, v in got["state"].items():
        # Adam's first step is ~lr * sign(g): rounding noise on near-zero gradients moves weights ~1e-6.
        torch.testing.assert_close(v, ref[k].detach().cpu(), atol=2e-5, rtol=1e-5, msg=k)
    # and the step really moved the weights
    moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in got["state"].items())
    assert moved > 1e-4
