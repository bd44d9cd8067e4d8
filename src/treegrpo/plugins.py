"""Load user extensions (environments, rewards, retrievers) named by import path in a config.

Only the module the config names is imported, so a config can point at code that lives outside
this package (``my_pkg.my_env:MyEnv``) without treegrpo knowing about it in advance.
"""

from __future__ import annotations

import importlib
from typing import Any

from treegrpo.errors import UserError


class PluginError(UserError, ValueError):
    """An import path in a config could not be resolved to an object."""


def load_object(path: str) -> Any:
    """Resolve ``"pkg.module:Name"`` (or ``"pkg.module.Name"``) to the named object.

    The part after ``:`` may be dotted (``"pkg.mod:Class.method"``). Every failure — bad syntax,
    missing module, an import error inside the module, missing attribute — becomes one
    :class:`PluginError` whose message names the path.
    """
    if not isinstance(path, str) or not path.strip():
        raise PluginError(f"plugin path must be a non-empty string like 'pkg.module:Name', got {path!r}")
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path or ":" in attr_path:
        raise PluginError(f"plugin path {path!r} is not of the form 'pkg.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise PluginError(f"plugin {path!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # an error raised while importing the user's module
        raise PluginError(
            f"plugin {path!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise PluginError(f"plugin {path!r}: {module_name!r} has no attribute {attr_path!r}") from e
    return obj


def load_callable(path: str) -> Any:
    """Like :func:`load_object`, but insists the result is callable (a class or a function)."""
    obj = load_object(path)
    if not callable(obj):
        raise PluginError(f"plugin {path!r} resolved to a non-callable {type(obj).__name__}")
    return obj
