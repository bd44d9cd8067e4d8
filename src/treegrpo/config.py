"""Run configuration: typed dataclasses, loaded from YAML, validated field by field.

Names follow TRL / verl where the concept is the same (`beta`, `epsilon`, `loss_agg_mode`,
`num_generations`, ...). Tree-GRPO's own knobs are `rollout.m`, `rollout.n`, `rollout.l`,
`rollout.strategy` and `advantage.estimator`. Every error names the offending dotted field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from treegrpo.advantage import ESTIMATORS
from treegrpo.errors import UserError
from treegrpo.expansion import STRATEGIES
from treegrpo.rollout import RolloutConfig
from treegrpo.rollout_memory import rollout_memory_problem


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names the field."""


_MAX_STEPS = 1_000_000
# Bounds of the rollout fields, whose dataclass lives with the sampler (rollout.py). Every count field
# has a maximum so that a typo fails here, not after minutes of growing memory; the product of the
# rollout's sizes is checked against memory by `rollout_memory_problem`.
ROLLOUT_BOUNDS: dict[str, dict[str, int]] = {
    "m": {"max": 256},
    "n": {"max": 64},
    "l": {"max": 32},
    "num_generations": {"max": 1024},
    "fixed_depth": {"max": 100},
    "max_waves": {"max": 1024},
    "max_context_tokens": {"max": 1_048_576},
}


@dataclass
class ModelConfig:
    # `path`: a HF model directory or hub-style name already on disk. Empty = build a tiny model
    # from `arch` with a tokenizer trained on the task corpus (the quickstart).
    path: str = ""
    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = field(default=96, metadata={"min": 8, "max": 16384})
    num_layers: int = field(default=3, metadata={"min": 1, "max": 256})
    num_heads: int = field(default=4, metadata={"min": 1, "max": 256})
    tokenizer: Literal["wordlevel", "bpe"] = "wordlevel"
    gguf_file: str = ""  # load weights from a GGUF file inside `path` (SmolLM2 preset)
    # auto: bfloat16 where this machine has fast bf16 matmuls (CUDA; CPUs with AVX512-BF16 or AMX), else
    # float32 (on an AVX2-only CPU torch's bf16 matmuls take a generic, far slower path)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # flex_attention: tree rows get a FlexAttention BlockMask (training needs CUDA: no CPU backward)
    attn_implementation: Literal["eager", "sdpa", "flex_attention"] = "sdpa"
    lora: bool = False
    lora_r: int = field(default=16, metadata={"min": 1, "max": 1024})
    lora_alpha: int = field(default=32, metadata={"min": 1, "max": 65536})
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class PolicyConfig:
    # hf: in-process transformers; vllm: colocated vLLM engine (GPU, `treegrpo[vllm]`); openai: a served
    # model behind an OpenAI-compatible completions API (vLLM, SGLang, `treegrpo serve-policy`); training
    # pushes its weights to the servers after each update (`weight_sync`).
    backend: Literal["hf", "vllm", "openai"] = "hf"
    temperature: float = field(default=1.0, metadata={"min": 0.0})
    top_p: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    max_new_tokens: int = field(default=48, metadata={"min": 1, "max": 32768})
    # openai: http://host:port (or …/v1) of the vLLM / SGLang / serve-policy server; comma-separate several
    base_url: str = ""
    # openai with several servers: sticky = every node of a tree on one server (prefix-cache hits);
    # round_robin / random: no affinity (baselines)
    routing: Literal["sticky", "round_robin", "random"] = "sticky"
    # openai training: how the servers get fresh weights after each update (auto = lora for LoRA models, else full)
    weight_sync: Literal["auto", "lora", "full", "none"] = "auto"
    api_model: str = ""  # openai: served model name; empty = the first one the server lists
    request_timeout: float = field(default=120.0, metadata={"min": 0.0})  # openai: seconds per request
    max_retries: int = field(default=2, metadata={"min": 0, "max": 100})  # openai: retries per request
    # vllm/openai: >0 = report the entropy of the top-k log-probs (a lower bound); 0 = no entropies
    entropy_topk: int = field(default=0, metadata={"min": 0, "max": 100})
    vllm_gpu_memory_utilization: float = field(default=0.5, metadata={"min": 0.01, "max": 1.0})
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM(...) engine arguments


@dataclass
class RetrieverConfig:
    kind: Literal["bm25", "http"] = "bm25"
    corpus: str = ""  # jsonl corpus for bm25; empty = the task's built-in corpus
    url: str = ""  # Search-R1 retrieval server, e.g. http://127.0.0.1:8000/retrieve
    timeout: float = field(default=10.0, metadata={"min": 0.0})
    max_retries: int = field(default=2, metadata={"min": 0, "max": 100})


@dataclass
class EnvConfig:
    name: str = "search_r1"  # or an import path "my_pkg.my_env:MyEnv"
    max_turns: int = field(default=4, metadata={"min": 1, "max": 100})
    topk: int = field(default=1, metadata={"min": 1, "max": 100})
    max_obs_tokens: int = field(default=64, metadata={"min": 1, "max": 32768})
    reward: str = "em_format"  # a registered reward or an import path
    template: str = ""  # prompt template with {question}; empty = the Search-R1 instruction
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to a plug-in environment's constructor


@dataclass
class DataConfig:
    task: str = "synthetic-kb"  # built-in task; ignored when train_path is set
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    train_path: str = ""  # parquet / jsonl / datasets dir
    eval_path: str = ""
    eval_size: int = field(default=200, metadata={"min": 1, "max": 100_000})


@dataclass
class AdvantageConfig:
    estimator: str = "tree"  # tree | tree_intra | tree_inter | tree_2norm | grpo | rloo
    eps: float = field(default=1e-6, metadata={"min": 0.0})


@dataclass
class TrainerConfig:
    steps: int = field(default=60, metadata={"min": 0, "max": _MAX_STEPS})
    prompts_per_step: int = field(default=16, metadata={"min": 1, "max": 8192})
    mini_batch_prompts: int = field(
        default=0, metadata={"min": 0, "max": 8192}
    )  # 0 = one optimizer step per rollout
    ppo_epochs: int = field(default=1, metadata={"min": 1, "max": 64})
    gradient_accumulation_steps: int = field(default=1, metadata={"min": 1, "max": 4096})
    lr: float = field(default=3e-4, metadata={"min": 0.0})
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata={"min": 0, "max": _MAX_STEPS})
    weight_decay: float = field(default=0.01, metadata={"min": 0.0})
    adam_beta1: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    adam_beta2: float = field(default=0.999, metadata={"min": 0.0, "max": 1.0})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})
    epsilon: float = field(default=0.2, metadata={"min": 0.0})
    epsilon_high: float = field(default=0.2, metadata={"min": 0.0})
    clip_ratio_c: float = field(default=3.0, metadata={"min": 1.0})
    beta: float = field(default=0.001, metadata={"min": 0.0})
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coeff: float = field(default=0.001)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    # tree: every unique token once (tree mask); leaf: one row per root→leaf path; path: memory-bounded
    # depth-first walk with per-branch backward (peak memory ≈ one path, for trees too large for a mask)
    packing: Literal["tree", "leaf", "path"] = "tree"
    # tree packing: bin whole trees first-fit-decreasing into rows of this many tokens; 0 = one row per tree,
    # -1 = rows as long as the micro-batch's largest tree (least padding and attention work, never splits)
    max_tokens_per_row: int = field(default=-1, metadata={"min": -1, "max": 1 << 22})
    # recompute each decoder layer's activations in the backward: activation memory of one layer instead of
    # all (the dense-mask attention weights are O(rows x T^2) per layer), at the cost of one more forward of
    # each layer in the backward (README: 1.13x the loss time on a tiny model). Not with packing 'path' (its
    # branches reuse the trunk's KV cache)
    gradient_checkpointing: bool = False
    # rows of hidden states per LM-head + fp32 log-softmax chunk (peak logits memory ≈ chunk × vocab × 4 B)
    logits_chunk: int = field(default=1024, metadata={"min": 1, "max": 1 << 22})
    # Truncated importance sampling for a sampler whose numerics differ from the trainer's (vLLM in bf16):
    # the per-token policy-gradient weight is min(exp(trainer_old - sampler), tis_cap). 0 = off.
    tis_cap: float = field(default=0.0, metadata={"min": 0.0, "max": 1e6})
    eval_every: int = field(default=20, metadata={"min": 0, "max": _MAX_STEPS})
    save_every: int = field(default=20, metadata={"min": 0, "max": _MAX_STEPS})
    keep_last: int = field(default=2, metadata={"min": 1, "max": 1000})
    max_bad_steps: int = field(default=3, metadata={"min": 1, "max": 1000})
    save_trees_every: int = field(default=10, metadata={"min": 0, "max": _MAX_STEPS})
    # openai backend: refuse to train on rollouts sampled more than this many weight versions ago
    max_staleness: int = field(default=1, metadata={"min": 0, "max": 1000})
    # openai backend: 1 = sample step t+1 on the servers (with the weights of step t) while step t trains;
    # staleness 1, corrected by tis_cap. 0 = sample each step with the weights it trains
    async_rollouts: int = field(default=0, metadata={"min": 0, "max": 1})


@dataclass
class WarmStartConfig:
    enabled: bool = True
    num_demos: int = field(default=300, metadata={"min": 0, "max": 1_000_000})
    epochs: int = field(default=3, metadata={"min": 0, "max": 1000})
    lr: float = field(default=3e-3, metadata={"min": 0.0})
    batch_size: int = field(default=16, metadata={"min": 1, "max": 4096})
    early_stop_prob: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    demos_path: str = ""  # jsonl demonstrations for any environment; empty = the built-in task's


@dataclass
class Config:
    name: str = "quickstart"
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    output_dir: str = "runs"
    cache_dir: str = ".cache/treegrpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_value(name: str, tp: Any, value: Any) -> Any:
    """Coerce `value` to the annotated type `tp` or raise ConfigError naming `name`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(name, args[0], value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = [n for n in fields if n.lower() == str(key).lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}")
        v = _check_value(dotted, hints[key], value)
        meta = {**fields[key].metadata, **(ROLLOUT_BOUNDS.get(key, {}) if cls is RolloutConfig else {})}
        if isinstance(v, int | float) and not isinstance(v, bool):
            if "min" in meta and v < meta["min"]:
                raise ConfigError(f"{dotted}: must be >= {meta['min']}, got {v}")
            if "max" in meta and v > meta["max"]:
                raise ConfigError(f"{dotted}: must be <= {meta['max']}, got {v}")
        kwargs[key] = v
    obj = cls(**kwargs)
    # Defaults of untouched fields also pass the range checks, by construction.
    return obj


def _validate(cfg: Config) -> Config:
    strategies, estimators = list(STRATEGIES), list(ESTIMATORS)  # the registries, plug-ins included
    if cfg.rollout.strategy not in strategies:
        raise ConfigError(
            f"rollout.strategy: must be one of {', '.join(strategies)}; got {cfg.rollout.strategy!r}"
        )
    try:
        cfg.rollout.validate()
    except ValueError as e:
        field_name, _, rest = str(e).partition(" must")
        raise ConfigError(f"{field_name}: must{rest}") from None
    if cfg.advantage.estimator not in estimators:
        raise ConfigError(
            f"advantage.estimator: must be one of {', '.join(estimators)}; got {cfg.advantage.estimator!r}"
        )
    if cfg.rollout.strategy != "chain" and cfg.rollout.m * (1 + cfg.rollout.n * cfg.rollout.l) < 2:
        raise ConfigError("rollout.m: a group needs at least 2 trajectories (m * (1 + n * l) >= 2)")
    if cfg.env.retriever.kind == "http" and not cfg.env.retriever.url:
        raise ConfigError("env.retriever.url: required when env.retriever.kind is 'http'")
    if cfg.model.lora and not cfg.model.path:
        raise ConfigError("model.lora: LoRA needs a pretrained model.path")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: must be a non-empty run name without '/'; got {cfg.name!r}")
    if cfg.trainer.packing == "path" and cfg.trainer.tis_cap > 0:
        raise ConfigError(
            "trainer.tis_cap: not supported with trainer.packing 'path' (its backward runs inside the loss); "
            "use packing tree or leaf"
        )
    if cfg.trainer.packing == "path" and cfg.trainer.gradient_checkpointing:
        raise ConfigError(
            "trainer.gradient_checkpointing: not supported with trainer.packing 'path' (its branches reuse "
            "the trunk's KV cache, and path mode already keeps about one path's activations); turn one off"
        )
    if cfg.trainer.async_rollouts and cfg.policy.backend != "openai":
        raise ConfigError(
            f"trainer.async_rollouts: 1 needs policy.backend 'openai' (generation on servers while this "
            f"process trains); the {cfg.policy.backend!r} backend samples with the training model itself"
        )
    if cfg.trainer.async_rollouts and cfg.trainer.max_staleness < 1:
        raise ConfigError(
            "trainer.max_staleness: 0 refuses every one-step-off rollout; trainer.async_rollouts: 1 needs >= 1"
        )
    problem = rollout_memory_problem(cfg)
    if problem:
        raise ConfigError(f"rollout: {problem}")
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=1e-5` → (["a", "b"], 1e-05). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "Question: {question}" is text, not a mapping; mappings need explicit braces
    return key.split("."), value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("treegrpo.presets").iterdir() if p.name.endswith(".yaml")
    )


NO_PRESET = "none"


def load_preset(name: str) -> dict[str, Any]:
    """A built-in preset's mapping; `none` is the empty mapping (the dataclass defaults only)."""
    if name == NO_PRESET:
        return {}
    path = resources.files("treegrpo.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"--preset {name}: unknown preset; choose from {', '.join([*preset_names(), NO_PRESET])}"
        )
    return yaml.safe_load(path.read_text()) or {}


def _task_of(data: dict[str, Any]) -> Any:
    section = data.get("data")
    return section.get("task", DataConfig.task) if isinstance(section, dict) else DataConfig.task


def _apply_layer(data: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Merge one layer (file, or all --set overrides) over `data`.

    `data.task_kwargs` belong to their task: a layer that switches `data.task` starts from no kwargs
    (plus its own), so `--set data.task=factbook` does not inherit synthetic-kb's `n_entities`.
    """
    section = layer.get("data")
    switches = isinstance(section, dict) and "task" in section and section["task"] != _task_of(data)
    if switches and isinstance(data.get("data"), dict):
        data = {**data, "data": {k: v for k, v in data["data"].items() if k != "task_kwargs"}}
    return _merge(data, layer)


def _overrides_layer(overrides: list[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for item in overrides:
        keys, value = parse_override(item)
        cur = layer
        for k in keys[:-1]:
            nxt = cur.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                cur[k] = nxt
            cur = nxt
        cur[keys[-1]] = value
    return layer


def _read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return loaded or {}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> Config:
    """Preset ← YAML file ← `--set` overrides (each merged key by key over the one before), validated.

    The preset is `preset`, else the file's top-level `preset:` key, else `quickstart`; `none` starts
    from the dataclass defaults. A file holding only `name: x` is the preset under another name.
    """
    loaded = _read_file(path) if path else {}
    file_preset = loaded.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"preset: expected a preset name, got {file_preset!r}")
    data = load_preset(preset or file_preset or "quickstart")
    data = _apply_layer(data, loaded)
    data = _apply_layer(data, _overrides_layer(overrides or []))
    cfg = _validate(_build(Config, data))
    if cfg.model.dtype == "auto":  # resolved here, so config.yaml and the cache key hold the real dtype
        from treegrpo.precision import auto_dtype

        cfg.model.dtype = auto_dtype()
    return cfg
