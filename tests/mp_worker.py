"""Worker for test_multiprocess: one process of a multi-process (gloo) update on fixed forests.

Run as `python mp_worker.py DATA OUT_DIR` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (what
torchrun sets). Every rank writes its parameters, metrics and learning rate to OUT_DIR/rank{R}.pt.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch


def main() -> None:
    data_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    blob = pickle.loads(data_path.read_bytes())
    from treegrpo.build import RunParts
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    cfg = load_config(None, blob["overrides"])
    model = blob["model"]
    if int(os.environ["RANK"]) > 0:  # a rank-dependent start: the trainer must take rank 0's weights
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    parts = RunParts(model=model, tokenizer=blob["tokenizer"], env=None, train_rows=[{}] * 64, eval_rows=[])
    trainer = Trainer(cfg, parts, out_dir / "run")
    assert trainer.world == int(os.environ["WORLD_SIZE"]), trainer.world
    rank, world = trainer.rank, trainer.world
    forests = blob["forests"]
    per_forest, k = [], 0  # per-tree advantages follow the forests' tree order
    for f in forests:
        per_forest.append(blob["per_tree_adv"][k : k + len(f.trees)])
        k += len(f.trees)
    mine = [a for f_advs in per_forest[rank::world] for a in f_advs]
    metrics = trainer.train_on(forests[rank::world], mine)
    state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    lr = float(trainer.scheduler.get_last_lr()[0])
    torch.save({"state": state, "metrics": metrics, "lr": lr}, out_dir / f"rank{rank}.pt")
    trainer.dist.close()


if __name__ == "__main__":
    main()
