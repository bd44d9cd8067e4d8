"""Worker for test_multiprocess: one process of a 2-process (gloo) training step on fixed forests.

Run as `python mp_worker.py DATA OUT` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch


def main() -> None:
    data_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    blob = pickle.loads(data_path.read_bytes())
    from treegrpo.build import RunParts
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    cfg = load_config(None, blob["overrides"])
    model = blob["model"]
    parts = RunParts(model=model, tokenizer=blob["tokenizer"], env=None, train_rows=[{}] * 64, eval_rows=[])
    trainer = Trainer(cfg, parts, out_path.parent / "run")
    assert trainer.world == int(os.environ["WORLD_SIZE"]), trainer.world
    rank = trainer.rank
    forests = blob["forests"][rank :: trainer.world]
    advs = blob["per_tree_adv"]
    # per-tree advantages follow the forests' tree order
    per_forest = []
    k = 0
    for f in blob["forests"]:
        per_forest.append(advs[k : k + len(f.trees)])
        k += len(f.trees)
    mine = [a for f_advs in per_forest[rank :: trainer.world] for a in f_advs]
    metrics = trainer.train_on(forests, mine)
    assert metrics is not None
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in trainer.unwrapped.state_dict().items()}
        torch.save({"state": state, "grad_norm": metrics["grad_norm"]}, out_path)


if __name__ == "__main__":
    main()
