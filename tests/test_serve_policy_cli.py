"""`treegrpo serve-policy` as a user runs it: a subprocess on the tiny config, real HTTP, clean errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_serve_policy_subprocess_serves_the_run_model(tiny_config: Path, capsys):
    cmd = [sys.executable, "-m", "treegrpo", "serve-policy", "--config", str(tiny_config), "--port", "0"]
    cmd += ["--prefix-cache-tokens", "4096", "--max-batch-rows", "8"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT
    )
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"serving tiny \(version 0\) on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                url = m.group(1)
                break
        assert url, "no announce line"
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
        body = json.dumps({"prompt": [3, 4, 5], "max_tokens": 4, "temperature": 0, "logprobs": 1}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            choice = json.loads(r.read())["choices"][0]
        assert 1 <= len(choice["token_ids"]) == len(choice["logprobs"]["token_logprobs"]) <= 4
        # `treegrpo eval` through the server scores exactly what the in-process eval scores
        from treegrpo.cli import main

        capsys.readouterr()
        assert main(["eval", "--config", str(tiny_config), "--backend", "openai", "--base-url", url]) == 0
        served = capsys.readouterr().out
        assert main(["eval", "--config", str(tiny_config)]) == 0
        local = capsys.readouterr().out
        assert f"served at {url}/v1" in served

        def scores(out: str) -> list[str]:
            return [ln for ln in out.splitlines() if ln.startswith("eval/")]

        assert scores(served) == scores(local) and scores(served)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_policy_bad_checkpoint_is_one_line_exit_2(tiny_config: Path, tmp_path: Path):
    cmd = [sys.executable, "-m", "treegrpo", "serve-policy", "--config", str(tiny_config)]
    proc = subprocess.run(
        [*cmd, "--checkpoint", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --checkpoint")
    proc = subprocess.run(
        [*cmd, "--max-batch-rows", "0"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --max-batch-rows: must be >= 1, got 0"
