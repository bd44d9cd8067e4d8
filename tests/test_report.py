"""`treegrpo report`: the HTML page and text summary, from a real tiny run and from hand-built run dirs,
checked statically and in a real headless Chromium driven over the DevTools protocol (pipe transport:
no network port, no extra Python package)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from treegrpo.errors import UserError
from treegrpo.granularity import granularity_metrics, per_depth
from treegrpo.report import (
    MAX_TEXT,
    load_run,
    report_cli,
    report_text,
    viewer_data,
    write_report,
)
from treegrpo.tree import ActionKind, Tree, group_forests, read_jsonl, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
EVIL = '</script><script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">&amp; <b>bold</b>'


# ----------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny but real training run made with the CLI: warm start, 2 RL steps, eval, saved trees."""
    from treegrpo.cli import main

    root = tmp_path_factory.mktemp("report_run")
    cfg = root / "tiny.yaml"
    cfg.write_text(
        f"name: tiny\noutput_dir: {root / 'runs'}\ncache_dir: {root / 'cache'}\n"
        "model: {hidden_size: 16, num_layers: 1, num_heads: 2}\n"
        "data: {task_kwargs: {seed: 0, n_entities: 20, max_hops: 2}, eval_size: 4}\n"
        "env: {max_turns: 2}\n"
        "trainer: {steps: 2, prompts_per_step: 2, eval_every: 2, save_every: 2, save_trees_every: 1}\n"
        "warmstart: {num_demos: 8, epochs: 1}\n"
        "policy: {max_new_tokens: 12}\n"
    )
    rc = main(["train", "--config", str(cfg), "--no-progress"])
    assert rc == 0, "the tiny training run failed"
    run = root / "runs" / "tiny"
    assert (run / "metrics.jsonl").is_file() and (run / "trees").is_dir()
    return run


def _leaf(t: Tree, parent: int, reward: float, text: str = "<answer> x </answer>") -> int:
    return t.add_child(
        parent, token_ids=[1, 2], action=ActionKind.ANSWER, text=text, is_leaf=True, reward=reward
    ).id


def _handmade_trees(text: str = "<think> look </think><search> q </search>") -> list[Tree]:
    trees = []
    for g in range(2):
        for k in range(2):
            t = Tree.new(f"task/{g}", k, [5, 6, 7])
            s = t.add_child(
                0, token_ids=[3, 4], obs_ids=[9], action=ActionKind.SEARCH, text=text, observation=text
            )
            a = _leaf(t, s.id, 1.0)
            b = _leaf(t, s.id, 0.0 if k == 0 else 1.0, text=text)
            c = _leaf(t, 0, 0.2)
            t.meta["advantages"] = {str(a): 1.0, str(b): -0.5, str(c): -0.5}
            trees.append(t)
    return trees


def _handmade_run(tmp_path: Path, *, eval_rows: bool, trees: bool, gran_keys: bool, text: str = "") -> Path:
    run = tmp_path / "hand"
    run.mkdir()
    (run / "config.yaml").write_text("name: hand\nrollout: {m: 2}\n")
    forest_trees = _handmade_trees(text) if text else _handmade_trees()
    rows: list[dict[str, Any]] = []
    for step in (1, 2, 3):
        row: dict[str, Any] = {
            "step": step,
            "train/reward_mean": 0.1 * step,
            "budget/generated_tokens": 100 + step,
            "budget/cum_generated_tokens": 100.0 * step,
            "budget/tool_calls": 4,
            "loss": 0.5,
        }
        if eval_rows and step != 2:
            row["eval/em"] = 0.25 * step
        if gran_keys:
            row.update(granularity_metrics(group_forests(forest_trees)))
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tor')
    if trees:
        (run / "trees").mkdir()
        for step in (1, 3):
            write_jsonl(forest_trees, run / "trees" / f"step-{step:06d}.jsonl")
        (run / "trees" / "step-000002.jsonl").write_text("{not json\n")
    return run


def _tree_json(page: str) -> dict[str, Any]:
    m = re.search(r"<script type='application/json' id='tree-data'>(.*?)</script>", page, re.S)
    assert m, "no tree-data block in the page"
    return json.loads(m.group(1))


def _shows(shown: str, text: str) -> bool:
    """The viewer shows a step's text whole, or its first MAX_TEXT characters and a note."""
    return shown == text if len(text) <= MAX_TEXT else shown.startswith(text[:MAX_TEXT] + "…")


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


# ----------------------------------------------------------------------------- static checks


def test_report_from_real_run(real_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_cli(str(real_run)) == 0
    out = capsys.readouterr().out
    path = real_run / "report.html"
    assert f"report: {path}" in out
    assert "eval EM, last" in out and "generated tokens (total)" in out
    assert "prompts with zero reward variance, first → last step" in out  # RL-signal diagnostics
    assert "depth 0:" in out and "signal share" in out  # granularity from the saved trees (or metrics)

    page = path.read_text(encoding="utf-8")
    imgs = _images(page)
    assert len(imgs) == 3 and all(i.startswith(b"\x89PNG") and len(i) > 2000 for i in imgs)
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", page)
    assert "<link" not in page

    data = _tree_json(page)
    steps = sorted(int(p.name[5:11]) for p in (real_run / "trees").glob("step-*.jsonl"))
    assert [s["step"] for s in data["steps"]] == steps
    # the viewer shows exactly the saved trees: node texts, rewards and advantages
    last = data["steps"][-1]
    forests = group_forests(read_jsonl(real_run / "trees" / f"step-{steps[-1]:06d}.jsonl"))
    assert [p["group"] for p in last["prompts"]] == [f.group_id for f in forests]
    for pv, forest in zip(last["prompts"], forests, strict=True):
        for tv, tree in zip(pv["trees"], forest.trees, strict=True):
            for n, nd in zip(tv["nodes"], tree.nodes, strict=True):
                assert _shows(n["t"], nd.text)
                assert n["a"] == str(nd.action) and n["leaf"] == nd.is_leaf
                if nd.is_leaf:
                    assert n["r"] == nd.reward
                    assert n["adv"] == pytest.approx(tree.meta["advantages"][str(nd.id)])


def test_handmade_run_with_granularity_metrics_and_bad_lines(tmp_path: Path) -> None:
    run_dir = _handmade_run(tmp_path, eval_rows=True, trees=True, gran_keys=True)
    run = load_run(run_dir)
    assert [r["step"] for r in run.metrics] == [1, 2, 3]  # the torn last line is skipped...
    assert any("unreadable" in w for w in run.warnings)  # ...and reported
    page = write_report(run).read_text(encoding="utf-8")
    assert "from the granularity/* metrics logged every step" in page
    assert "cannot read trees" in page  # the corrupt tree file is named, the others still shown
    data = _tree_json(page)
    assert [s["step"] for s in data["steps"]] == [1, 3]
    # each hand-made tree: root split (depth 0) and a split at the search step (depth 1)
    t0 = data["steps"][0]["prompts"][0]["trees"][0]["nodes"]
    assert t0[0]["s"] is not None and t0[1]["s"] is not None and t0[2]["s"] is None
    assert t0[0]["adv"] == pytest.approx(0.0) and t0[1]["adv"] == pytest.approx(0.5)  # ΣA of shared steps
    assert t0[1]["v"] == pytest.approx(0.5) and t0[1]["n"] == 2
    text = report_text(run_dir)
    assert "eval EM, first: 0.25" in text and "eval EM, last: 0.75" in text
    assert "depth 0:" in text and "depth 1:" in text


def test_granularity_recomputed_from_trees_when_metrics_lack_it(tmp_path: Path) -> None:
    run_dir = _handmade_run(tmp_path, eval_rows=False, trees=True, gran_keys=False)
    text = report_text(run_dir)
    assert "no evaluation in this run" in text
    assert "(saved trees)" in text
    expected = granularity_metrics(group_forests(_handmade_trees()))
    shares = per_depth(expected, "signal_share")
    for d, share in shares.items():
        assert f"depth {d}:" in text and f"{share:6.1%}" in text
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "recomputed from the 2 saved tree file(s)" in page


def test_run_without_trees_or_eval(tmp_path: Path) -> None:
    run_dir = _handmade_run(tmp_path, eval_rows=False, trees=False, gran_keys=False)
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "no saved trees in this run" in page
    assert "id='tree-data'" not in page and "<script>" not in page
    assert len(_images(page)) == 3
    text = report_text(run_dir)
    assert "no granularity data" in text and "no evaluation in this run" in text


def test_bad_run_dirs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a treegrpo run directory"):
        report_text(tmp_path / "empty")


def test_model_text_is_escaped(tmp_path: Path) -> None:
    run_dir = _handmade_run(tmp_path, eval_rows=True, trees=True, gran_keys=False, text=EVIL)
    (run_dir / "config.yaml").write_text(f"name: '{EVIL}'\n")
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "<img src=x" not in page and "window.__pwned=1</script>" not in page
    assert page.count("<script") == 2  # only ours: the JSON block and the viewer
    assert "&lt;img src=x onerror=" in page  # the config, escaped
    data = _tree_json(page)
    assert data["steps"][0]["prompts"][0]["trees"][0]["nodes"][1]["t"] == EVIL  # verbatim after JSON decoding
    assert viewer_data(load_run(run_dir))["steps"][0]["prompts"][0]["trees"][0]["nodes"][1]["o"] == EVIL


# ----------------------------------------------------------------------------- headless browser

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)",
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3/4, NUL-separated JSON)."""

    FLAGS = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-pipe",
    ]

    def __init__(self, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. bash moves the pipe ends there
        # (no preexec_fn, which is unsafe with threads) and closes the originals before exec.
        wire = 'exec "$0" "$@" 3<&"$CDP_IN" 4>&"$CDP_OUT" {CDP_IN}<&- {CDP_OUT}>&-'
        self._log = open(profile.parent / "chromium.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                "/bin/bash",
                "-c",
                wire,
                str(CHROMIUM),
                *self.FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(cmd_r, res_w),
            env={**os.environ, "CDP_IN": str(cmd_r), "CDP_OUT": str(res_w)},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        os.close(cmd_r)
        os.close(res_w)
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._res_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._q.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._q.put(json.loads(msg))

    def _next(self, deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("chromium did not answer in time")
        try:
            msg = self._q.get(timeout=left)
        except queue.Empty as e:
            raise TimeoutError("chromium did not answer in time") from e
        if msg is None:
            raise RuntimeError("chromium closed the DevTools pipe")
        return msg

    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 20.0
    ) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            r = self._next(deadline)
            if r.get("id") == self._id:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error']}")
                return r.get("result", {})
            self.events.append(r)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            e = self._next(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def js(self, expr: str) -> Any:
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise AssertionError(
                f"page script failed: {r['exceptionDetails'].get('exception', {}).get('description')}"
            )
        return r["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (scrolled into view)."""
        box = self.js(
            f"(function(){{var e=document.querySelector({json.dumps(selector)});e.scrollIntoView({{block:'center'}});"
            "var r=e.getBoundingClientRect();return [r.left+Math.min(r.width/2,40), r.top+r.height/2];})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
            )

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("exception", {}).get("description") or p))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(str(p["entry"].get("text")))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._cmd_w)
        self._log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    b = Chromium(tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


@needs_chromium
def test_browser_loads_report_and_expands_a_node(real_run: Path, browser: Chromium) -> None:
    path = write_report(real_run)
    browser.open(path.as_uri())
    assert browser.js("document.body.dataset.viewerReady") == "1"
    assert browser.js("document.querySelectorAll('img.plot').length") == 3
    assert browser.js(
        "Array.from(document.images).every(function(i){return i.complete && i.naturalWidth > 100})"
    )
    n_nodes = browser.js("document.querySelectorAll('#forest details.node').length")
    assert n_nodes >= 2
    # the first step node under the first root starts collapsed: its text is not rendered
    sel = "#forest details.tree details.node[data-node='1'] > summary"
    state = (
        f"(function(){{var d=document.querySelector({json.dumps(sel)}).parentElement;"
        "var t=d.querySelector(':scope > .steptext');"
        "return [d.open, t.checkVisibility(), t.getBoundingClientRect().height, t.textContent];})()"
    )
    assert browser.js(state)[:2] == [False, False]
    browser.click(sel)
    is_open, visible, height, shown = browser.js(state)
    assert is_open and visible and height > 0
    steps = sorted((real_run / "trees").glob("step-*.jsonl"))
    first_tree = next(read_jsonl(steps[-1]))  # the viewer opens on the last saved step, first prompt
    assert _shows(shown, first_tree.nodes[1].text)
    # switching prompt re-renders the forest from the other prompt's trees
    n_prompts = browser.js("document.getElementById('prompt-select').options.length")
    assert n_prompts >= 2
    browser.js(
        "(function(){var s=document.getElementById('prompt-select');s.value='1';"
        "s.dispatchEvent(new Event('change'));})()"
    )
    assert browser.js("document.querySelectorAll('#forest details.tree').length") >= 1
    browser.click("#expand-all")
    assert browser.js(
        "Array.from(document.querySelectorAll('#forest details')).every(function(d){return d.open})"
    )
    assert browser.errors() == []


@needs_chromium
def test_browser_does_not_run_model_text(tmp_path: Path, browser: Chromium) -> None:
    run_dir = _handmade_run(tmp_path, eval_rows=True, trees=True, gran_keys=True, text=EVIL)
    path = write_report(run_dir)
    browser.open(path.as_uri())
    browser.click("#expand-all")
    assert browser.js("typeof window.__pwned") == "undefined"
    assert browser.js("document.querySelectorAll('#forest img, #forest b').length") == 0
    texts = browser.js(
        "Array.from(document.querySelectorAll('#forest .steptext')).map(function(e){return e.textContent})"
    )
    assert EVIL in texts
    assert browser.errors() == []


@needs_chromium
def test_browser_harness_sees_page_errors(tmp_path: Path, browser: Chromium) -> None:
    """The 'no console errors' checks above are only meaningful if broken pages are caught."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); missingFunction();</script></body></html>")
    browser.open(page.as_uri())
    errs = browser.errors()
    assert any("boom" in e for e in errs)
    assert any("missingFunction" in e for e in errs)
