"""``env.name: tools``: an agent that calls Python functions in its model's native tool-calling format.

Tools are plain typed, documented functions named by import path (``my_pkg.tools:lookup``) or by a
built-in name (``search``, ``calculator``, ``python``); their JSON schemas come from
``transformers.utils.get_json_schema``. The prompt is the tokenizer's chat template rendered with
``tools=`` (or treegrpo's Hermes template when the model's ignores tools), returned as ids.

A step is one assistant message, ended by the end-of-turn token (``stop_strings = ()``). Its
``<tool_call>{"name", "arguments"}</tool_call>`` blocks are parsed strictly and run, each under a
timeout; every failure is an error text in the tool message. The observation is the tool turn as the
template renders it after the sampled end-of-turn token: tool message(s) and the next assistant header,
tokenized once and masked from the loss. A message without a tool call is the final answer and ends
the episode; after ``max_turns`` tool turns the next message is final whatever it contains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from treegrpo.envs.chat_format import ChatFormat, format_call
from treegrpo.envs.tool_calls import has_tool_call, parse_tool_calls, run_tool_calls
from treegrpo.errors import UserError
from treegrpo.protocols import Prompt, StepResult, question_messages
from treegrpo.rewards import RewardFn, exact_match, extract_answer, get_reward
from treegrpo.tree import ActionKind

BUILTIN_TOOLS = {
    "calculator": "treegrpo.tools.calculator:calculator",
    "python": "treegrpo.tools.python_sandbox:python",
    "search": "",  # built over the configured retriever
}


def uses_search(tools: Sequence[Any]) -> bool:
    return any(t == "search" for t in tools)


def final_answer_em(response: str, golden_answers: list[str]) -> float:
    """Exact match of the final message (its ``<answer>`` span when it has one) against the gold answers."""
    pred = extract_answer(response)
    return exact_match(pred if pred is not None else response.strip(), golden_answers)


@dataclass(frozen=True)
class ToolState:
    """One episode, as a value. ``response``: assistant texts and tool results so far."""

    question: str
    golden_answers: tuple[str, ...]
    turns: int = 0  # tool turns taken
    calls: int = 0
    response: str = ""
    final: str | None = None
    done: bool = False


def resolve_tools(specs: Sequence[Any], retriever: Any = None, topk: int = 3) -> list[Callable[..., Any]]:
    """Functions for built-in names, import paths or callables; bad entries are one UserError line."""
    from treegrpo.plugins import load_callable

    if isinstance(specs, str) or not isinstance(specs, Sequence) or not specs:
        raise UserError("env.kwargs.tools: a non-empty list of tools (built-in names or 'pkg.module:fn')")
    fns: list[Callable[..., Any]] = []
    for spec in specs:
        if callable(spec):
            fns.append(spec)
        elif spec == "search":
            if retriever is None:
                raise UserError(
                    "env.kwargs.tools: the search tool needs a retriever (env.retriever.corpus or url)"
                )
            from treegrpo.tools.search import make_search_tool

            fns.append(make_search_tool(retriever, topk))
        elif isinstance(spec, str) and spec in BUILTIN_TOOLS:
            fns.append(load_callable(BUILTIN_TOOLS[spec]))
        elif isinstance(spec, str):
            fns.append(load_callable(spec))
        else:
            raise UserError(f"env.kwargs.tools: {spec!r} is not a tool name or import path")
    return fns


def tool_schemas(fns: Sequence[Callable[..., Any]]) -> list[dict[str, Any]]:
    from transformers.utils import get_json_schema

    out = []
    for fn in fns:
        try:
            out.append(get_json_schema(fn))
        except Exception as e:  # noqa: BLE001 - transformers raises its own parsing exceptions
            raise UserError(
                f"env.kwargs.tools: {getattr(fn, '__name__', fn)}: {e} (a tool needs type hints and a "
                "Google-style docstring with an Args: section)"
            ) from None
    names = [s["function"]["name"] for s in out]
    if len(set(names)) != len(names):
        raise UserError(f"env.kwargs.tools: tool names must be unique, got {names}")
    return out


class ToolsEnv:
    """Multi-turn tool calling in the Hermes / Qwen style, token ids in and out."""

    stop_strings: tuple[str, ...] = ()  # a step ends with the end-of-turn token

    def __init__(
        self,
        tools: Sequence[Any],
        tokenizer: Any = None,
        retriever: Any = None,
        reward_fn: str | RewardFn | None = None,
        max_turns: int = 4,
        tool_timeout: float = 10.0,
        topk: int = 3,
        system_prompt: str | None = None,
        template: str | None = None,
        chat_template: str = "",
        log: Callable[[str], None] = print,
    ) -> None:
        if max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {max_turns}")
        if tool_timeout <= 0:
            raise ValueError(f"tool_timeout must be > 0 seconds, got {tool_timeout}")
        self.functions = resolve_tools(tools, retriever, topk)
        self.schemas = tool_schemas(self.functions)
        self.by_name = {s["function"]["name"]: fn for s, fn in zip(self.schemas, self.functions, strict=True)}
        self.function_schemas = {s["function"]["name"]: s["function"] for s in self.schemas}
        self.max_turns = int(max_turns)
        self.tool_timeout = float(tool_timeout)
        self.system_prompt = system_prompt
        self.template = template or "{question}"
        self.reward_fn: RewardFn = get_reward(reward_fn) if reward_fn is not None else final_answer_em
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer, self.schemas, chat_template, log)
        self.format.check_prefix_preserving()  # before training: refuse a template that rewrites history

    # ---- episode start ---------------------------------------------------------------------------
    def build_prompt(self, question: str) -> list[dict[str, str]]:
        return question_messages(self.template, question, self.system_prompt)

    def start(self, row: Mapping[str, Any]) -> tuple[ToolState, Prompt]:
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"row {row.get('group_id', '?')}: 'question' must be a non-empty string")
        golds = row.get("golden_answers", [])
        golds = [golds] if isinstance(golds, str) else list(golds)
        state = ToolState(question.strip(), tuple(str(g) for g in golds))
        prompt = row.get("prompt")
        messages = (
            [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
            if isinstance(prompt, list) and prompt
            else self.build_prompt(state.question)
        )
        if self.tokenizer is None:
            return state, messages
        return state, self.format.prompt_ids(messages)

    # ---- one step for many branches --------------------------------------------------------------
    def _clean(self, action: Any) -> str:
        text = action if isinstance(action, str) else ""
        eos = self.format.eos_text
        if eos and text.endswith(eos):  # demonstrations spell the end-of-turn token out
            text = text[: -len(eos)]
        return text

    def step(self, states: Sequence[ToolState], actions: Sequence[str]) -> list[StepResult]:
        if len(states) != len(actions):
            raise ValueError(f"step got {len(states)} states but {len(actions)} actions")
        results: list[StepResult | None] = [None] * len(states)
        pending: list[tuple[int, str, list[Any]]] = []
        for i, (state, action) in enumerate(zip(states, actions, strict=True)):
            if not isinstance(state, ToolState) or state.done:
                raise ValueError(f"states[{i}] is not a running ToolState")
            text = self._clean(action)
            if state.turns >= self.max_turns or not has_tool_call(text):
                kind = ActionKind.ANSWER if not has_tool_call(text) else ActionKind.FORCED_FINAL
                done = replace(state, response=state.response + text, final=text, done=True)
                results[i] = StepResult(done, "", True, kind)
            else:
                pending.append((i, text, parse_tool_calls(text, self.function_schemas)))
        flat = [c for _, _, calls in pending for c in calls]
        outputs = iter(run_tool_calls(flat, self.by_name, self.tool_timeout)) if flat else iter(())
        for i, text, calls in pending:
            outs = [next(outputs) for _ in calls]
            obs = self.format.tool_turn_text([o for o, _ in outs])
            failed = sum(f for _, f in outs)
            state = states[i]
            new = replace(
                state,
                turns=state.turns + 1,
                calls=state.calls + len(calls),
                response=state.response + text + "".join(f"\n{o}" for o, _ in outs) + "\n",
            )
            kind = ActionKind.INVALID if all(c.error for c in calls) else ActionKind.SEARCH
            results[i] = StepResult(new, obs, False, kind, tool_calls=len(calls), tool_failures=failed)
        return [r for r in results if r is not None]

    def reward(self, state: ToolState) -> float:
        return float(self.reward_fn(state.final or "", list(state.golden_answers)))

    # ---- demonstrations and tokenizer texts ------------------------------------------------------
    def render_demo_step(self, message: Mapping[str, Any]) -> str:
        """An assistant message of a demonstration (content + ``tool_calls``) as the step text."""
        return self.format.demo_step(message)

    def tokenizer_tokens(self) -> list[str]:
        """Pieces a tokenizer trained for this environment keeps whole: the tags and the JSON scaffolding
        of a call (as a byte-level BPE trained on code would merge them), so a tiny model writes a call in
        about a dozen tokens instead of forty."""
        tags = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
        return [*tags, '{"name": "', '", "arguments": {"', '": "', '"}}', '", "', '": {"', '"}']

    def tokenizer_texts(self) -> list[str]:
        """The scaffolding a tokenizer trained for this environment must cover."""
        sample = self.format.render(self.build_prompt("x"), add_generation_prompt=True)
        calls = [format_call(n, {}) for n in self.by_name]
        errors = [
            "Error: malformed tool call JSON unknown tool available missing required argument(s) "
            "unexpected argument(s) must be of type got timed out after s unterminated tool call without",
            "CalculatorError SandboxError ValueError TypeError RuntimeError",
        ]
        return [sample, self.format.tool_turn_text(["x", "y"]), *calls, *errors]


def tools_env_from_config(cfg: Any, retriever: Any, tokenizer: Any) -> ToolsEnv:
    """`env.name: tools` from a run config (`env.kwargs` holds tools, tool_timeout, chat_template, ...)."""
    from treegrpo.config import EnvConfig

    kwargs = dict(cfg.env.kwargs)
    if "tools" not in kwargs:
        raise UserError("env.kwargs.tools: required for env.name=tools (e.g. [calculator, my_pkg.tools:fn])")
    reward = cfg.env.reward if cfg.env.reward != EnvConfig().reward else None
    kwargs.setdefault("max_turns", cfg.env.max_turns)
    kwargs.setdefault("topk", cfg.env.topk)
    if cfg.env.template:
        kwargs.setdefault("template", cfg.env.template)
    try:
        return ToolsEnv(tokenizer=tokenizer, retriever=retriever, reward_fn=reward, **kwargs)
    except TypeError as e:
        raise UserError(f"env.kwargs: {e}") from None
    except ValueError as e:
        raise UserError(f"env.kwargs: {e}") from None


__all__ = [
    "BUILTIN_TOOLS",
    "ToolState",
    "ToolsEnv",
    "final_answer_em",
    "tools_env_from_config",
    "uses_search",
]
