"""The run directory: one training run at a time, refused before it changes anything.

``<run_dir>/.lock`` carries an exclusive ``fcntl.flock`` for the life of the run's driver rank
and names its holder (pid, launcher pid, host, start time). A second run on the same directory
is refused with that name before it writes a byte: no metrics line, no store record, no
checkpoint. The kernel drops the lock when the holder dies, however it dies, so a stale file
never blocks a restart. (flock works across the nodes of NFSv4 and Lustre mounts; on a file
system without locks the claim fails with the system's message.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megatron_mel.config import ConfigError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # lock path -> open descriptor, kept for the life of the process


class RunDirLocked(ConfigError):
    """Another live run holds the run directory."""


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; ConfigError if it exists and is not a directory."""
    root = Path(run_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"launch.run_dir: {root} is a file, not a directory; point launch.run_dir at a "
            "directory (it is created if missing)"
        )
    for parent in root.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"launch.run_dir: {parent} (a parent of {root}) is a file")
    return root


def claim_run_dir(run_dir: str | Path) -> None:
    """Take the run directory's lock for this process (driver rank; idempotent)."""
    root = check_run_dir(run_dir)
    path = root / LOCK_NAME
    if str(path) in _held:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"launch.run_dir: cannot create {path} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirLocked(
            f"launch.run_dir: {root} is in use by another run ({holder}); wait for it to end, "
            "stop it, or choose another launch.run_dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"launch.run_dir: cannot lock {path} ({exc.strerror})") from None
    info = {
        "pid": os.getpid(),
        "launcher_pid": int(os.environ.get("MEGATRON_MEL_LAUNCHER_PID") or os.getpid()),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[str(path)] = fd


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        launcher = info.get("launcher_pid")
        via = f", launcher pid {launcher}" if launcher and launcher != info.get("pid") else ""
        return f"pid {info['pid']} on host {info['host']}{via}, since {info['started']}"
    return "holder unknown"
