"""Shared fixtures: a tiny end-to-end run config (seconds on two CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

# Two torch threads thrash when pytest shares the machine with anything else; one is faster here.
torch.set_num_threads(1)

TINY = {
    "preset": "none",  # the dataclass defaults + these values, not the quickstart preset's
    "name": "tiny",
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "data": {"task_kwargs": {"seed": 0, "n_entities": 40, "max_hops": 2}, "eval_size": 8},
    "env": {"max_turns": 3},
    "policy": {"max_new_tokens": 24},
    "trainer": {"steps": 3, "prompts_per_step": 4, "eval_every": 2, "save_every": 2, "save_trees_every": 1},
    "warmstart": {"num_demos": 16, "epochs": 1},
}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One warm-start cache for the whole session, so each tiny run skips tokenizer training and SFT."""
    return tmp_path_factory.mktemp("treegrpo-cache")


@pytest.fixture
def tiny_config(tmp_path: Path, shared_cache: Path) -> Path:
    cfg = dict(TINY, output_dir=str(tmp_path / "runs"), cache_dir=str(shared_cache))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
