"""Training through `serve-policy` servers (real HTTP on 127.0.0.1): weight sync, mismatch, staleness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from policy_servers import served_run_model
from treegrpo.config import load_config
from treegrpo.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _metrics(run: Path) -> dict[int, dict]:
    return {
        r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"]
    }


def _served(urls: list[str], *extra: str) -> list[str]:
    """Overrides that train through the servers at `urls` (no evaluation), plus `extra`."""
    return ["policy.backend=openai", f"policy.base_url={','.join(urls)}", "trainer.eval_every=0", *extra]


def _faster_lr(tiny_config: Path) -> None:
    """lr 0.05: one update moves the log-probs visibly."""
    raw = yaml.safe_load(tiny_config.read_text())
    raw["trainer"]["lr"] = 0.05
    tiny_config.write_text(yaml.safe_dump(raw))


def test_weights_follow_the_trainer_and_mismatch_is_rounding(tiny_config: Path):
    from treegrpo.trainer import train

    cfg = load_config(str(tiny_config))
    with served_run_model(cfg, n=2) as urls:
        summary = train(load_config(str(tiny_config), _served(urls)), progress=False)
        for u in urls:
            import urllib.request

            with urllib.request.urlopen(u + "/health", timeout=30) as r:
                health = json.loads(r.read())
            assert health["version"] == summary["steps"] == 3  # the servers hold the trainer's last step
            assert health["prefix_reuse_tokens"] > 0
    m = _metrics(Path(summary["run_dir"]))
    for step in (1, 2, 3):
        assert m[step]["train/staleness"] == 0.0
        assert m[step]["train/logprob_mismatch"] < 1e-4  # same weights: rounding only
        assert 0.0 < m[step]["rollout/server_prefix_hit"] < 1.0
        assert m[step]["train/policy_version"] == step


def test_without_sync_the_mismatch_grows_and_the_stale_guard_stops(tiny_config: Path):
    from treegrpo.trainer import train

    _faster_lr(tiny_config)
    cfg = load_config(str(tiny_config))
    with served_run_model(cfg, n=1) as urls:
        sets = _served(urls, "policy.weight_sync=none", "trainer.max_staleness=1", "trainer.save_every=1")
        with pytest.raises(UserError, match="max_staleness"):
            train(load_config(str(tiny_config), sets), progress=False)
    run = Path(cfg.output_dir) / cfg.name
    m = _metrics(run)
    assert m[1]["train/logprob_mismatch"] < 1e-4  # step 1 still samples the starting weights
    assert m[2]["train/logprob_mismatch"] > 1e-3 and m[2]["train/staleness"] == 1.0


def test_async_rollouts_sample_one_step_off(tiny_config: Path):
    """Step t+1 is sampled with the weights of step t while step t trains: staleness 0, 1, 1; the
    sampler/trainer mismatch is rounding only where the weights agree (step 1)."""
    from treegrpo.trainer import train

    _faster_lr(tiny_config)
    cfg = load_config(str(tiny_config))
    with served_run_model(cfg, n=1) as urls:
        sets = _served(urls, "trainer.async_rollouts=1", "trainer.tis_cap=2.0")
        summary = train(load_config(str(tiny_config), sets), progress=False)
    assert summary["steps"] == 3
    a = _metrics(Path(summary["run_dir"]))
    assert [a[s]["train/staleness"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert [a[s]["train/policy_version"] for s in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert a[1]["train/logprob_mismatch"] < 1e-4
    assert a[2]["train/logprob_mismatch"] > 1e-3 and a[3]["train/logprob_mismatch"] > 1e-3
    for s in (1, 2, 3):
        assert 0.0 <= a[s]["time/rollout_wait_seconds"] <= a[s]["time/step_seconds"]
        assert a[s]["time/rollout_seconds"] > 0.0


def test_async_rollouts_beyond_the_staleness_bound_stop_cleanly(tiny_config: Path):
    """Without weight sync every one-step-off rollout is one version older: the guard stops the run at
    the first rollout 2 versions old, and no rollout thread is left behind."""
    import threading

    from treegrpo.trainer import train

    cfg = load_config(str(tiny_config))
    with served_run_model(cfg, n=1) as urls:
        sets = _served(urls, "policy.weight_sync=none", "trainer.async_rollouts=1")
        with pytest.raises(UserError, match="max_staleness"):
            train(load_config(str(tiny_config), sets), progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("rollout")]
    m = _metrics(Path(cfg.output_dir) / cfg.name)
    assert [m[s]["train/staleness"] for s in sorted(m)] == [0.0, 1.0]
