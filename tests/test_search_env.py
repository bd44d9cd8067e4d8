"""The Search-R1 environment: actions, observations, turn limits, failures, immutable states."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from treegrpo.envs import ENVS, get_env_class
from treegrpo.envs.search_r1 import (
    INVALID_ACTION_OBS,
    NO_RESULTS_BODY,
    SEARCH_FAILED_BODY,
    SearchR1Env,
    SearchState,
)
from treegrpo.protocols import Environment
from treegrpo.retrievers import BM25Retriever, HTTPRetriever, Passage, make_server
from treegrpo.rewards import extract_answer
from treegrpo.tree import ActionKind

DOCS = [
    {"id": "1", "title": "Marie Curie", "text": "Marie Curie was born in Warsaw and won two Nobel prizes."},
    {"id": "2", "title": "Warsaw", "text": "Warsaw is the capital of Poland, on the Vistula river."},
    {"id": "3", "title": "Vistula", "text": "The Vistula is the longest river in Poland."},
]
ROW = {"question": "Which river flows through the birthplace of Marie Curie?", "golden_answers": ["Vistula"]}


class Counting:
    """Wraps a retriever and records every batched call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, topk):
        self.calls.append(list(queries))
        return self.inner.search(queries, topk)


class Failing:
    def search(self, queries, topk):
        raise RuntimeError("index exploded")


@pytest.fixture(scope="module")
def bm25() -> BM25Retriever:
    return BM25Retriever(docs=DOCS)


def test_is_an_environment_and_registered(bm25):
    env = SearchR1Env(bm25)
    assert isinstance(env, Environment)
    assert ENVS["search_r1"] is SearchR1Env
    assert get_env_class("search_r1") is SearchR1Env
    assert get_env_class("treegrpo.envs.search_r1:SearchR1Env") is SearchR1Env
    with pytest.raises(ValueError, match="unknown environment"):
        get_env_class("nope")


def test_start_builds_prompt_or_uses_row_prompt(bm25):
    env = SearchR1Env(bm25, system_prompt="You are helpful.")
    state, prompt = env.start(ROW)
    assert state == SearchState(ROW["question"], ("Vistula",))
    assert prompt[0] == {"role": "system", "content": "You are helpful."}
    content = prompt[1]["content"]
    for tag in ("<think>", "<search>", "<information>", "<answer>"):
        assert tag in content
    assert content.rstrip().endswith(ROW["question"])
    given = [{"role": "user", "content": "custom {x} prompt"}]
    _, p2 = env.start({**ROW, "prompt": given})
    assert p2 == given
    env2 = SearchR1Env(bm25, template="Q: {question} {json: 1}")
    assert env2.start(ROW)[1] == [{"role": "user", "content": f"Q: {ROW['question']} {{json: 1}}"}]
    with pytest.raises(ValueError, match="question"):
        env.start({"golden_answers": ["x"]})
    with pytest.raises(ValueError, match="golden_answers"):
        env.start({"question": "q", "golden_answers": [1]})
    with pytest.raises(ValueError, match="placeholder"):
        SearchR1Env(bm25, template="no placeholder")


def test_full_episode_reaches_reward_1(bm25):
    env = SearchR1Env(bm25, topk=2)
    s0, _ = env.start(ROW)
    r1 = env.step([s0], ["<think>Where was she born?</think>\n<search> Marie Curie born Warsaw </search>"])[0]
    assert r1.action is ActionKind.SEARCH and not r1.done and r1.tool_calls == 1 and r1.tool_failures == 0
    assert r1.observation.startswith("\n\n<information>Doc 1(Title: Marie Curie) Marie Curie was born")
    assert r1.observation.endswith("</information>\n\n")
    assert "\nDoc 2(Title: " in r1.observation
    r2 = env.step([r1.state], ["<think>Warsaw. Which river?</think>\n<search> Warsaw river </search>"])[0]
    assert "Vistula" in r2.observation
    r3 = env.step([r2.state], ["<think>The Vistula.</think>\n<answer> Vistula </answer>"])[0]
    assert r3.done and r3.action is ActionKind.ANSWER and r3.observation == ""
    assert r3.state.searches == 2 and r3.state.turns == 2
    assert env.reward(r3.state) == 1.0
    assert env.reward(r2.state) == 0.0  # unfinished: no answer yet


def test_invalid_action_observation(bm25):
    env = SearchR1Env(bm25)
    s0, _ = env.start(ROW)
    r = env.step([s0], ["I will just ramble without any tag"])[0]
    assert r.action is ActionKind.INVALID and not r.done
    assert r.observation == INVALID_ACTION_OBS
    assert r.tool_calls == 0
    assert r.state.turns == 1 and r.state.searches == 0
    assert r.state.response == "I will just ramble without any tag" + INVALID_ACTION_OBS
    # The observation must not read as an answer: no answer → 0.0, not "wrong answer" 0.1.
    assert extract_answer(INVALID_ACTION_OBS) is None


def test_max_turns_then_forced_final(bm25):
    counting = Counting(bm25)
    env = SearchR1Env(counting, max_turns=2)
    s, _ = env.start(ROW)
    kinds = []
    for _ in range(2):
        r = env.step([s], ["<think>x</think><search>Warsaw</search>"])[0]
        kinds.append(r.action)
        s = r.state
    assert kinds == [ActionKind.SEARCH, ActionKind.SEARCH] and not s.done
    # The forced final step: a search is NOT executed and the branch ends.
    r = env.step([s], ["<think>more</think><search>Vistula</search>"])[0]
    assert r.done and r.action is ActionKind.FORCED_FINAL and r.observation == ""
    assert r.tool_calls == 0 and len(counting.calls) == 2
    # An answer in the forced final step is an ANSWER and is scored.
    r = env.step([s], ["<think>ok</think><answer>Vistula</answer>"])[0]
    assert r.done and r.action is ActionKind.ANSWER
    assert env.reward(r.state) == 1.0
    with pytest.raises(ValueError, match="finished"):
        env.step([r.state], ["<answer>x</answer>"])


def test_invalid_steps_count_as_turns(bm25):
    env = SearchR1Env(bm25, max_turns=1)
    s, _ = env.start(ROW)
    s = env.step([s], ["junk"])[0].state
    r = env.step([s], ["still junk"])[0]
    assert r.done and r.action is ActionKind.FORCED_FINAL
    assert env.reward(r.state) == 0.0


def test_batched_search_one_call_for_all_branches(bm25):
    counting = Counting(bm25)
    env = SearchR1Env(counting)
    s, _ = env.start(ROW)
    actions = [
        "<search>Marie Curie</search>",
        "<answer>Warsaw</answer>",
        "nothing",
        "<think>t</think><search>Vistula river</search>",
        "<search></search>",
    ]
    out = env.step([s] * len(actions), actions)
    assert counting.calls == [["Marie Curie", "Vistula river", ""]]
    assert [r.action for r in out] == [
        ActionKind.SEARCH,
        ActionKind.ANSWER,
        ActionKind.INVALID,
        ActionKind.SEARCH,
        ActionKind.SEARCH,
    ]
    assert "Title: Marie Curie" in out[0].observation and "Title: Vistula" in out[3].observation
    assert NO_RESULTS_BODY in out[4].observation


def test_branching_from_one_state_is_independent(bm25):
    env = SearchR1Env(bm25)
    s0, _ = env.start(ROW)
    mid = env.step([s0], ["<think>a</think><search>Marie Curie</search>"])[0].state
    snapshot = dataclasses.astuple(mid)
    a = env.step([mid], ["<think>b</think><answer>Vistula</answer>"])[0].state
    b = env.step([mid], ["<think>c</think><search>Warsaw</search>"])[0].state
    c = env.step([mid], ["<think>b</think><answer>Vistula</answer>"])[0].state
    assert dataclasses.astuple(mid) == snapshot  # the parent state never changes
    assert a == c and a != b
    assert a.done and not b.done and b.searches == 2 and a.searches == 1
    assert a.response.startswith(mid.response) and b.response.startswith(mid.response)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mid.turns = 5  # type: ignore[misc]


def test_action_text_need_not_end_with_a_tag(bm25):
    env = SearchR1Env(bm25)
    s, _ = env.start(ROW)
    text = "<think>t</think><search>Warsaw</search>\n"  # the tail of the token holding the stop tag
    r = env.step([s], [text])[0]
    assert r.action is ActionKind.SEARCH
    assert r.state.response.startswith(text)  # the generated text is kept verbatim


# ---- observation cap -----------------------------------------------------------------------
LONG = [Passage(str(i), f"T{i}", " ".join(f"w{i}_{j}" for j in range(50)), 1.0) for i in range(3)]


class Fixed:
    def search(self, queries, topk):
        return [LONG[:topk] for _ in queries]


def test_obs_cap_by_words():
    env = SearchR1Env(Fixed(), max_obs_tokens=40, topk=3)
    s, _ = env.start(ROW)
    obs = env.step([s], ["<search>q</search>"])[0].observation
    assert len(obs.split()) <= 40
    assert obs.startswith("\n\n<information>Doc 1(Title: T0) w0_0") and obs.endswith("</information>\n\n")
    big = SearchR1Env(Fixed(), max_obs_tokens=10_000, topk=3)
    full = big.step([s], ["<search>q</search>"])[0].observation
    assert len(full.split()) > 40 and "Doc 3(Title: T2)" in full
    assert obs[: -len("</information>\n\n")] in full  # a prefix of the full observation


def _tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    corpus = [
        f"Doc {i}(Title: T{i}) " + " ".join(p.text for p in LONG) + " <information></information>"
        for i in range(3)
    ]
    tok.train_from_iterator(corpus, trainer)

    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.mark.parametrize("wrap", [False, True])
def test_obs_cap_by_tokenizer(wrap):
    raw = _tiny_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw) if wrap else raw
    env = SearchR1Env(Fixed(), max_obs_tokens=60, topk=3, tokenizer=tok)
    s, _ = env.start(ROW)
    obs = env.step([s], ["<search>q</search>"])[0].observation
    n = len(raw.encode(obs).ids)
    assert 40 <= n <= 60
    assert obs.endswith("</information>\n\n") and obs.startswith("\n\n<information>Doc 1")
    tiny = SearchR1Env(Fixed(), max_obs_tokens=1, tokenizer=tok)
    assert tiny.step([s], ["<search>q</search>"])[0].observation == "\n\n<information></information>\n\n"


# ---- retriever failures become observations -------------------------------------------------
class _Bad(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.mode == "slow":
            time.sleep(0.5)
        body = b"not json at all" if self.server.mode == "garbage" else b'{"error": "x"}'
        code = 200 if self.server.mode == "garbage" else 500
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def bad_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bad)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_failure_observed(env: SearchR1Env) -> None:
    s, _ = env.start(ROW)
    out = env.step([s, s], ["<think>t</think><search>Warsaw</search>", "<answer>Vistula</answer>"])
    r = out[0]
    assert r.action is ActionKind.SEARCH and not r.done
    assert r.tool_calls == 1 and r.tool_failures == 1
    assert r.observation == f"\n\n<information>{SEARCH_FAILED_BODY}</information>\n\n"
    assert out[1].done and out[1].action is ActionKind.ANSWER
    # The episode continues after the outage, and the outage is not a format error of the agent.
    final = env.step([r.state], ["<think>guess</think><answer>Vistula</answer>"])[0]
    assert env.reward(final.state) == 1.0


@pytest.mark.parametrize("mode", ["500", "garbage", "slow"])
def test_http_failures_become_observations(bad_server, mode):
    bad_server.mode = mode
    host, port = bad_server.server_address[:2]
    client = HTTPRetriever(f"http://{host}:{port}/retrieve", timeout=0.2, max_retries=1, backoff=0)
    _assert_failure_observed(SearchR1Env(client))


def test_dead_server_and_raising_retriever_become_observations():
    dead = HTTPRetriever(f"http://127.0.0.1:{_free_port()}", timeout=0.5, max_retries=1, backoff=0)
    _assert_failure_observed(SearchR1Env(dead))
    _assert_failure_observed(SearchR1Env(Failing()))


def test_env_over_real_http_server_matches_in_process(bm25):
    server = make_server(bm25, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = SearchR1Env(HTTPRetriever(server.url, timeout=5))
        local = SearchR1Env(bm25)
        s, _ = local.start(ROW)
        acts = ["<search>Marie Curie</search>", "<search>Poland river</search>"]
        assert [r.observation for r in remote.step([s, s], acts)] == [
            r.observation for r in local.step([s, s], acts)
        ]
    finally:
        server.shutdown()
        server.server_close()


def test_reward_plugins(bm25):
    env = SearchR1Env(bm25, reward_fn="f1_format")
    s, _ = env.start({"question": "q?", "golden_answers": ["Vistula river"]})
    r = env.step([s], ["<think>t</think><answer>Vistula</answer>"])[0]
    assert env.reward(r.state) == pytest.approx(0.2 + 0.8 * (2 / 3))
    env2 = SearchR1Env(bm25, reward_fn=lambda resp, golds: float(len(golds)))
    assert env2.reward(r.state) == 1.0


def test_bad_step_arguments(bm25):
    env = SearchR1Env(bm25)
    s, _ = env.start(ROW)
    with pytest.raises(ValueError, match="2 states but 1 actions"):
        env.step([s, s], ["x"])
    with pytest.raises(ValueError, match="SearchState"):
        env.step([{"not": "a state"}], ["x"])
    assert env.step([s], [None])[0].action is ActionKind.INVALID  # type: ignore[list-item]
    assert json.dumps(dataclasses.asdict(s))  # states are plain values
