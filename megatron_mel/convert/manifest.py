"""Checksums of a checkpoint directory: written when it is saved, checked before it is loaded.

    <dir>/manifest.json   {"format": 1, "algorithm": "sha256",
                           "files": {"model/__0_0.distcp": {"size": 51623654, "sha256": "..."}}}

Every file under the directory but the manifest is listed, so a flipped byte, a truncated file or
a missing shard is found before any of it reaches a model. Training checkpoints and conversion
outputs both carry one; a directory written before manifests existed loads with a warning.

Hashing is shared by the ranks of a job (file ``i`` of the sorted list goes to rank
``i % world``): the ``collective_*`` functions must be called by every rank; the others are local.
The module imports no megatron-core.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from megatron_mel.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = 1
_CHUNK = 8 * 2**20


class CorruptCheckpoint(ConfigError):
    """A checkpoint file does not match its manifest (the message names the file)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: str | Path) -> list[str]:
    """Relative POSIX paths of every file under ``root`` except the manifest, sorted."""
    base = Path(root)
    return sorted(
        p.relative_to(base).as_posix()
        for p in base.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    )


def hash_files(root: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    base = Path(root)
    return {
        name: {"size": (base / name).stat().st_size, "sha256": file_sha256(base / name)}
        for name in names
    }


def write_manifest(root: str | Path, entries: dict[str, dict[str, Any]]) -> None:
    body = {"format": FORMAT, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    tmp = Path(root) / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(Path(root) / MANIFEST_NAME)


def read_manifest(root: str | Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's file table; None if the directory has none (older checkpoints)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if body.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {body.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable checkpoint manifest ({exc})") from None
    return files


def check_files(root: str | Path, table: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Problems of the files ``names`` of ``table`` (one line each, naming the file)."""
    base = Path(root)
    problems = []
    for name in names:
        want, path = table[name], base / name
        if not path.is_file():
            problems.append(f"{path}: missing (listed in {MANIFEST_NAME})")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(
                f"{path}: {size} bytes, {MANIFEST_NAME} says {want['size']} (truncated?)"
            )
        elif file_sha256(path) != want["sha256"]:
            problems.append(f"{path}: checksum mismatch (sha256 differs from {MANIFEST_NAME})")
    return problems


def verify(root: str | Path) -> bool:
    """Check every file of ``root`` in this process; True if verified, False if there is no
    manifest (warned); CorruptCheckpoint naming the first bad file otherwise."""
    table = read_manifest(root)
    if table is None:
        log.warning("%s has no %s (written before checksums): not verified", root, MANIFEST_NAME)
        return False
    problems = check_files(root, table, sorted(table))
    if problems:
        raise CorruptCheckpoint(_summary(problems))
    return True


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


# -- collective ------------------------------------------------------------------------------


def _share(items: list[str]) -> tuple[list[str], Any, int]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    return items[rank::world], dist, world


def collective_write(root: str | Path) -> None:
    """Hash ``root``'s files across the ranks and write the manifest on rank 0 (all ranks call;
    every file must be written and visible to all ranks before)."""
    names = list_files(root)
    mine, dist, world = _share(names)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, hash_files(root, mine))
    if dist.get_rank() == 0:
        write_manifest(root, {k: v for part in parts for k, v in part.items()})


def collective_verify(root: str | Path) -> bool:
    """:func:`verify` with the hashing shared by the ranks; every rank gets the same answer
    (True verified, False no manifest) or the same CorruptCheckpoint."""
    table = read_manifest(root)  # the same file on every rank: the same answer or error
    if table is None:
        log.warning("%s has no %s (written before checksums): not verified", root, MANIFEST_NAME)
        return False
    mine, dist, world = _share(sorted(table))
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, check_files(root, table, mine))
    problems = [p for part in parts for p in part]
    if problems:
        raise CorruptCheckpoint(_summary(problems))
    return True
