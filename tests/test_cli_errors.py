"""Bad config, data and paths through the real CLI: exit code 2, one line naming the culprit, no traceback.

Also the security defaults: the retriever server binds loopback unless told otherwise, and plug-ins are
imported only from the paths a config names (model output never is).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import treegrpo.plugins
from treegrpo.build import build_env
from treegrpo.cli import build_parser, main
from treegrpo.config import ConfigError, load_config
from treegrpo.envs.search_r1 import SearchState
from treegrpo.retrievers import BM25Retriever, make_server, serve

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.bogus=1", "trainer.bogus"),
        ("rollout.mm=3", "rollout.mm"),
        ("trainer.lr=fast", "trainer.lr"),
        ("rollout.m=two", "rollout.m"),
        ("env.retriever=http", "env.retriever"),
        ("rollout.m=0", "rollout.m"),
        ("rollout.n=-1", "rollout.n"),
        ("rollout.l=-1", "rollout.l"),
        ("env.max_turns=0", "env.max_turns"),
        ("model.path=/nonexistent/model", "model.path"),
        ("data.train_path=/nonexistent/train.jsonl", "/nonexistent/train.jsonl"),
        ("env.retriever.corpus=/nonexistent/corpus.jsonl", "env.retriever.corpus"),
        ("env.retriever.kind=http", "env.retriever.url"),
        ("env.name=no_such_module:Env", "no_such_module"),
        ("env.reward=no_such_module:fn", "no_such_module"),
    ],
)
def test_train_rejects_bad_config_with_one_line(tiny_config: Path, capsys, override: str, named: str) -> None:
    code = main(["train", "--config", str(tiny_config), "--no-progress", "--set", override])
    line = _one_error_line(capsys)
    assert code == 2, line
    assert named in line, line


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        (
            ['{"question": "q0", "golden_answers": ["a"]}', "{not json", '{"question": "q2"}'],
            "line 2 (row 1)",
        ),
        (['{"question": "q0", "golden_answers": ["a"]}', '{"question": "q1"}'], "row 1"),
        (['{"question": "", "golden_answers": ["a"]}'], "row 0"),
        (['["a", "list"]'], "row 0"),
        (['{"question": "q", "golden_answers": ["a"], "index": 1}'] * 2, "row 1"),
        ([], "empty"),
    ],
    ids=["invalid-json", "no-answers", "empty-question", "not-an-object", "duplicate-id", "empty-file"],
)
def test_malformed_dataset_names_the_row(tiny_config: Path, tmp_path: Path, capsys, lines, named) -> None:
    data = _write_jsonl(tmp_path / "train.jsonl", lines)
    code = main(["train", "--config", str(tiny_config), "--no-progress", "--set", f"data.train_path={data}"])
    line = _one_error_line(capsys)
    assert code == 2 and str(data) in line and named in line, line


def test_unknown_dataset_format_and_bad_eval_path(tiny_config: Path, tmp_path: Path, capsys) -> None:
    weird = tmp_path / "train.csv"
    weird.write_text("question,answer\n")
    assert main(["train", "--config", str(tiny_config), "--set", f"data.train_path={weird}"]) == 2
    assert "unknown format" in _one_error_line(capsys)
    bad = _write_jsonl(tmp_path / "eval.jsonl", ["{oops"])
    assert main(["train", "--config", str(tiny_config), "--set", f"data.eval_path={bad}"]) == 2
    assert str(bad) in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        (['{"id": "0", "title": "Paris"}'], ":1: document has neither 'text' nor 'contents'"),
        (['{"id": "0", "text": "ok"}', "", '{"id": "1", "text": 3}'], ":3:"),
        (['{"id": "0", "text": "ok"}', "[garbage"], ":2: invalid JSON"),
        ([], "has no documents"),
    ],
    ids=["no-text", "text-not-a-string", "invalid-json", "empty"],
)
def test_corpus_without_the_needed_fields(tiny_config: Path, tmp_path: Path, capsys, lines, named) -> None:
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", lines)
    code = main(["train", "--config", str(tiny_config), "--set", f"env.retriever.corpus={corpus}"])
    line = _one_error_line(capsys)
    assert code == 2 and str(corpus) in line and named in line, line


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        ([f"env.retriever.url=http://127.0.0.1:{_free_port()}/retrieve"], "is unreachable"),
        (["env.retriever.url=localhost:8000"], "must look like http://"),
        (
            ["env.retriever.url=http://127.0.0.1:9/retrieve", "env.retriever.timeout=0"],
            "env.retriever.timeout",
        ),
    ],
    ids=["connection-refused", "not-a-url", "zero-timeout"],
)
def test_unreachable_or_malformed_retriever_at_start_up(tiny_config: Path, capsys, sets, named) -> None:
    args = ["train", "--config", str(tiny_config), "--set", "env.retriever.kind=http"]
    args += ["--set", "env.retriever.max_retries=0"]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    line = _one_error_line(capsys)
    assert code == 2 and named in line, line
    if "timeout" not in named:
        assert "env.retriever.url" in line


def test_bad_paths_on_other_commands(tiny_config: Path, tmp_path: Path, capsys) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _one_error_line(capsys)
    assert main(["eval", "--config", str(tiny_config), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "--checkpoint" in _one_error_line(capsys)
    assert main(["serve-retriever", "--corpus", str(tmp_path / "none.jsonl"), "--port", "0"]) == 2
    assert "none.jsonl" in _one_error_line(capsys)
    assert main(["train", "--preset", "no-such-preset"]) == 2
    assert "--preset no-such-preset" in _one_error_line(capsys)


def test_debug_flag_raises_instead(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match="rollout.m"):
        main(["--debug", "train", "--config", str(tiny_config), "--set", "rollout.m=0"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "treegrpo", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_process_exit_codes_and_traceback_only_with_debug() -> None:
    r = _cli("config", "show", "--set", "rollout.n=-1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: rollout.n: must be >= 0, got -1"]
    r = _cli("--debug", "config", "show", "--set", "rollout.n=-1")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "ConfigError: rollout.n" in r.stderr


# ---- security --------------------------------------------------------------------------------------
def test_retriever_server_binds_loopback_by_default() -> None:
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    args = build_parser().parse_args(["serve-retriever", "--corpus", "c.jsonl"])
    assert args.host == "127.0.0.1"
    server = make_server(BM25Retriever(docs=[{"id": "0", "title": "t", "text": "x"}]), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_plugins_are_imported_only_from_config_paths(monkeypatch) -> None:
    calls: list[str] = []
    real = treegrpo.plugins.load_object

    def recording(path: str):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(treegrpo.plugins, "load_object", recording)
    retriever = BM25Retriever(docs=[{"id": "0", "title": "Paris", "text": "capital of France"}])
    env = build_env(load_config(None, []), retriever, None)
    assert calls == []  # the built-in environment and reward import nothing
    for path in ("reliability_plugins:switchable_reward", "reliability_plugins:SearchEveryStep"):
        calls.clear()
        field = "env.reward" if path.endswith("reward") else "env.name"
        build_env(load_config(None, [f"{field}={path}"]), retriever, None)
        assert calls == [path]

    # Model output that names modules or contains code is only ever text.
    calls.clear()
    env.step([SearchState("q", ("a",))], ["<answer>x</answer>"])  # warm up lazy imports
    before = set(sys.modules)
    outputs = [
        "<answer>os:system</answer>",
        "<search>reliability_plugins:switchable_reward</search>",
        "<answer>__import__('subprocess').run(['id'])</answer>",
        json.dumps({"env": {"reward": "os:system"}}),
    ]
    for text in outputs:
        for r in env.step([SearchState("q", ("a",))], [text]):
            if r.done:
                env.reward(r.state)
    assert calls == []
    assert set(sys.modules) == before
