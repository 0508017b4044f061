"""Extension points named by dotted path in the config, each with its signature as a Protocol.

A hook is ``"package.module:function"`` (or ``package.module.function``). ``load_hook`` imports
it and checks its parameters against the Protocol before any work starts, so a typo or a wrong
signature is a config error, not a crash in the middle of step 40.

Hooks:

* ``RewardFn`` (``reward.function``): ``(response, answer) -> float | (float, label)``. Runs in
  the verifier's worker processes under a hard timeout; ``label`` (e.g. "answerless") is counted
  in the ``reward/<label>`` metrics.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from megatron_mel.config import ConfigError


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, response: str, answer: str) -> float | tuple[float, str]: ...


HOOK_ARITY: dict[type, int] = {RewardFn: 2}


def split_path(path: str) -> tuple[str, str]:
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ConfigError(f"hook {path!r}: expected 'package.module:function'")
    return module, attr


def _origin(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc`` (where the hook's module raised)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def load_hook(path: str, protocol: type, *, key: str = "hook") -> Callable:
    """Import ``path`` and check it fits ``protocol``; ConfigError naming ``key`` otherwise."""
    module_name, attr = split_path(path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({exc})") from exc
    except Exception as exc:  # the module itself raised while being imported
        raise ConfigError(
            f"{key}: importing {module_name!r} raised {type(exc).__name__}: {exc} "
            f"(at {_origin(exc)}); fix the module or point {key} at another one"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key}: {module_name!r} has no callable {attr!r}")
    arity = HOOK_ARITY[protocol]
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn  # builtins without a signature: trust the protocol
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    if len(required) > arity or (len(positional) < arity and not variadic):
        raise ConfigError(
            f"{key}: {path} must accept {arity} positional arguments "
            f"({protocol.__name__}: {inspect.signature(protocol.__call__)})"
        )
    return fn
