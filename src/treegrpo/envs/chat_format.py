"""The chat template a tool-calling environment renders with, and the checks that make it safe to train on.

Token-in/token-out training appends each tool turn as ids to the ids the policy sampled. That is exact
only if the template is *prefix-preserving*: rendering the whole conversation must give the same
tokens as the prompt, the sampled steps and the tool turns laid end to end. Some templates rewrite
history (Qwen3-style templates drop earlier ``<think>`` spans); some ignore ``tools=`` entirely
(SmolLM2's). Both are caught here, before training, with one line naming the problem; the remedy is
treegrpo's own ChatML/Hermes training template (``env.kwargs.chat_template: hermes``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from treegrpo.errors import UserError
from treegrpo.tokenizer import IM_END, TINY_TOOLS_CHAT_TEMPLATE, TOOLS_CHAT_TEMPLATE

_SENTINEL = "\u2063treegrpo-step\u2063"
HERMES = "hermes"


class TemplateError(UserError, ValueError):
    """The chat template cannot be trained on token-in/token-out (the message says why and what to do)."""


def _sample_value(schema: Mapping[str, Any]) -> Any:
    t = schema.get("type")
    t = t[0] if isinstance(t, list) and t else t
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    return {"integer": 2, "number": 2.5, "boolean": True, "array": [], "object": {}}.get(str(t), "2 + 3")


def sample_arguments(function: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments that satisfy a function schema's required parameters (for the prefix check)."""
    params = function.get("parameters", {}) or {}
    props = params.get("properties", {}) or {}
    return {p: _sample_value(props.get(p, {})) for p in params.get("required", [])}


def format_call(name: str, arguments: Any) -> str:
    """One Hermes-style call, exactly as the training template renders an assistant ``tool_calls`` entry."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n</tool_call>"
    )


class ChatFormat:
    """Renders prompts and tool turns with one template; `tokenizer=None` renders text only."""

    def __init__(
        self,
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]],
        chat_template: str = "",
        log: Callable[[str], None] = print,
    ) -> None:
        self.tokenizer = tokenizer
        self.tools = [dict(t) for t in tools]
        self.names = [t["function"]["name"] for t in self.tools]
        self.eos_text = str(getattr(tokenizer, "eos_token", None) or IM_END)
        self.template, self.source = self._choose(chat_template, log)

    # -- rendering ---------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        kw: dict[str, Any] = {"tools": self.tools or None, "add_generation_prompt": add_generation_prompt}
        if self.tokenizer is None:
            from transformers.utils.chat_template_utils import render_jinja_template

            out, _ = render_jinja_template(
                conversations=[list(messages)], chat_template=self.template, eos_token=IM_END, **kw
            )
            return out[0]
        return str(
            self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False, **kw
            )
        )

    def encode(self, text: str) -> list[int]:
        out: Any = self.tokenizer.encode(text, add_special_tokens=False)
        return [int(t) for t in getattr(out, "ids", out)]

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def tool_turn_text(self, results: Sequence[str]) -> str:
        """What follows a sampled step that ended with the end-of-turn token: tool message(s) + next header.

        Rendered by the template from a two-turn stand-in conversation (end of the assistant turn, the
        tool messages, the next assistant header), then the end-of-turn token, which the policy
        sampled, is cut off the front. Tokenized once, on its own, by the sampler.
        """
        base: list[dict[str, Any]] = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": _SENTINEL},
        ]
        before = self.render(base, add_generation_prompt=False)
        cut = before.find(_SENTINEL) + len(_SENTINEL)
        after = self.render(
            base + [{"role": "tool", "content": r} for r in results], add_generation_prompt=True
        )
        if after[:cut] != before[:cut]:
            raise TemplateError(
                f"env.kwargs.chat_template: the {self.source} chat template renders an assistant turn "
                "differently once a tool message follows it; set env.kwargs.chat_template=hermes"
            )
        turn = after[cut:]
        return turn[len(self.eos_text) :] if turn.startswith(self.eos_text) else turn

    def demo_step(self, message: Mapping[str, Any]) -> str:
        """An assistant message with `tool_calls` as the step text the model writes (end-of-turn included)."""
        parts = [str(message.get("content") or "")] if message.get("content") else []
        for call in message.get("tool_calls") or []:
            f = call.get("function", call) if isinstance(call, Mapping) else {}
            parts.append(format_call(str(f.get("name", "")), f.get("arguments", {})))
        return "\n".join(parts) + self.eos_text

    # -- checks ------------------------------------------------------------------------------------
    def _choose(self, option: str, log: Callable[[str], None]) -> tuple[str, str]:
        if self.tokenizer is None and not option:  # text only: for training the tiny model's tokenizer
            return TINY_TOOLS_CHAT_TEMPLATE, "tiny model's"
        if option == HERMES:
            return TOOLS_CHAT_TEMPLATE, "treegrpo Hermes"
        if option and option != "model":
            if "{" not in option:
                raise TemplateError(
                    f"env.kwargs.chat_template: {option!r} is neither 'hermes', 'model' nor a jinja template"
                )
            return option, "configured"
        own = getattr(self.tokenizer, "chat_template", None)
        if not isinstance(own, str) or not own:
            if option == "model":
                raise TemplateError(
                    "env.kwargs.chat_template: the tokenizer has no chat template; use 'hermes'"
                )
            log("env: the tokenizer has no chat template; using treegrpo's Hermes tool template")
            return TOOLS_CHAT_TEMPLATE, "treegrpo Hermes"
        self.template = own
        try:
            shown = self.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that cannot render tools at all
            shown = ""
            log(f"env: the tokenizer's chat template failed to render tools ({type(e).__name__}: {e})")
        missing = [n for n in self.names if n not in shown]
        if missing:
            if option == "model":
                raise TemplateError(
                    f"env.kwargs.chat_template: the model's chat template ignores tools= (the prompt does not "
                    f"name {', '.join(missing)}); use env.kwargs.chat_template=hermes"
                )
            log(
                "env: the tokenizer's chat template ignores tools= (the rendered prompt does not name "
                f"{', '.join(missing)}); using treegrpo's Hermes tool template instead"
            )
            return TOOLS_CHAT_TEMPLATE, "treegrpo Hermes"
        return own, "model's"

    def check_prefix_preserving(self) -> None:
        """Refuse (one line) a template whose full rendering differs from the turns' ids laid end to end."""
        if self.tokenizer is None:
            return
        fn = self.tools[0]["function"] if self.tools else {"name": "tool"}
        user = [{"role": "user", "content": "What is 2 + 3?"}]
        step = "<think>I will call a tool.</think>\n" + format_call(fn["name"], sample_arguments(fn))
        final = "<think>The tool said 5.</think>\nThe answer is 5."
        ids = self.prompt_ids(user) + self.encode(step + self.eos_text)
        ids += self.encode(self.tool_turn_text(["5"])) + self.encode(final + self.eos_text)
        whole = user + [
            {"role": "assistant", "content": step},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": final},
        ]
        full = self.encode(self.render(whole, add_generation_prompt=False))
        rest = full[len(ids) :]
        if full[: len(ids)] == ids and not self.tokenizer.decode(rest, skip_special_tokens=False).strip():
            return
        at = next(
            (i for i, (a, b) in enumerate(zip(full, ids, strict=False)) if a != b), min(len(full), len(ids))
        )
        seen = self.tokenizer.decode(full[max(0, at - 4) : at + 8], skip_special_tokens=False)
        raise TemplateError(
            f"env.kwargs.chat_template: the {self.source} chat template is not prefix-preserving (rendering the "
            f"whole conversation differs from the turns laid end to end at token {at}: {seen!r}), so "
            "token-in/token-out training would drift; set env.kwargs.chat_template=hermes (treegrpo's "
            "ChatML/Hermes training template) or give a jinja template that never rewrites past turns"
        )


__all__ = ["HERMES", "ChatFormat", "TemplateError", "format_call", "sample_arguments"]
