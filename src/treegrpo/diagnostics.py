"""Why is there no RL signal? Per-step diagnostics of sampled forests.

A group-relative estimator learns only from prompts whose leaves got different rewards. A pretrained
model that never closes an action inside its step budget, or that never follows the protocol, gives
every leaf of a group the same reward: the advantages are all zero and the update does nothing. These
numbers say which of those is happening, step by step. Pure: forests in, numbers out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from treegrpo.tree import ActionKind, Forest

# Labels of the logged keys, in the order the report shows them.
LABELS = {
    "signal/zero_variance_groups": "prompts with zero reward variance",
    "signal/format_valid_rate": "format-valid responses",
    "signal/action_closed_rate": "steps that closed an action",
    "signal/step_tokens_mean": "generated tokens per step",
    "signal/truncated_step_share": "steps cut by the token budget",
}

# Steps that did not close an action the environment understood: unparsable, cut at the context
# limit, or a forced final step that still gave no answer. Any other kind (search, answer, a tool
# call of a plug-in protocol) counts as closed.
_NOT_CLOSED = {ActionKind.INVALID, ActionKind.TRUNCATED, ActionKind.FORCED_FINAL}


def signal_diagnostics(
    forests: Sequence[Forest],
    max_new_tokens: int,
    format_valid: Callable[[str], bool] | None = None,
    atol: float = 1e-9,
) -> dict[str, float]:
    """Diagnostics of one step's forests (all rates in [0, 1]).

    - `signal/zero_variance_groups`: share of prompts whose leaf rewards are all equal (no signal).
    - `signal/format_valid_rate`: share of leaves whose response passes `format_valid` (when given).
    - `signal/action_closed_rate`: share of generated steps that ended in an action the environment
      parsed (search, answer, a tool call) rather than an invalid, truncated or answerless forced one.
    - `signal/step_tokens_mean`: mean generated tokens per step.
    - `signal/truncated_step_share`: share of generated steps that used the whole `max_new_tokens`
      budget (cut by the budget, not by a stop string) or were truncated at the context limit.
    """
    groups = 0
    flat = 0
    leaves = 0
    valid = 0
    steps = 0
    closed = 0
    truncated = 0
    step_tokens = 0
    for forest in forests:
        rewards = [float(leaf.reward or 0.0) for _, leaf in forest.leaves()]
        if rewards:
            groups += 1
            flat += bool(np.ptp(rewards) <= atol)
        for tree, leaf in forest.leaves():
            leaves += 1
            if format_valid is not None:
                valid += bool(format_valid(tree.response_text(leaf.id)))
        for tree in forest.trees:
            for node in tree.nodes[1:]:
                steps += 1
                step_tokens += len(node.token_ids)
                closed += node.action not in _NOT_CLOSED
                truncated += len(node.token_ids) >= max_new_tokens or node.action == ActionKind.TRUNCATED
    out = {
        "signal/zero_variance_groups": flat / groups if groups else 0.0,
        "signal/action_closed_rate": closed / steps if steps else 0.0,
        "signal/step_tokens_mean": step_tokens / steps if steps else 0.0,
        "signal/truncated_step_share": truncated / steps if steps else 0.0,
    }
    if format_valid is not None:
        out["signal/format_valid_rate"] = valid / leaves if leaves else 0.0
    return out


def no_signal_warning(diag: dict[str, float], threshold: float = 0.5) -> str | None:
    """One line when most groups carry no signal, naming the likeliest cause; None otherwise."""
    share = diag.get("signal/zero_variance_groups", 0.0)
    if share <= threshold:
        return None
    causes = []
    if diag.get("signal/truncated_step_share", 0.0) > 0.5:
        causes.append(
            f"{diag['signal/truncated_step_share']:.0%} of steps hit the token budget "
            "(raise policy.max_new_tokens or warm-start the model to close its actions)"
        )
    if diag.get("signal/action_closed_rate", 1.0) < 0.5:
        causes.append(f"only {diag['signal/action_closed_rate']:.0%} of steps closed a valid action")
    if "signal/format_valid_rate" in diag and diag["signal/format_valid_rate"] < 0.5:
        causes.append(f"only {diag['signal/format_valid_rate']:.0%} of responses are format-valid")
    why = "; ".join(causes) if causes else "every leaf of a prompt got the same reward"
    return f"no RL signal: {share:.0%} of prompts have zero reward variance ({why})"


class SignalWarnings:
    """Rate-limits `no_signal_warning`: the first step that crosses the threshold, then every `every`
    steps while it persists. A run that learns with half its groups flat should not print every step."""

    def __init__(self, every: int = 10, threshold: float = 0.5) -> None:
        self.every, self.threshold = every, threshold
        self._since: int | None = None  # steps since the last printed warning, None when not in a streak

    def check(self, diag: dict[str, float]) -> str | None:
        why = no_signal_warning(diag, self.threshold)
        if why is None:
            self._since = None
            return None
        if self._since is None or self._since + 1 >= self.every:
            self._since = 0
            return why
        self._since += 1
        return None
