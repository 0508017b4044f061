"""Run a function on N local worker processes, or on the ranks a launcher already started.

Tools such as checkpoint conversion are "one command": under ``torchrun``/``srun`` they run on
the launched ranks; started plainly, they spawn ``world_size`` local workers themselves (gloo on
CPU, one GPU each with CUDA). The worker function must be importable (module level), and scripts
that call this need an ``if __name__ == "__main__":`` guard because workers are spawned.

A job of one rank runs in the calling process instead: a spawned worker would re-import torch
and megatron-core (seconds) while the idle parent kept its own ~0.45 GiB of imports resident.
It gets the same environment and the same error contract as a spawned rank 0. Call it from an
entry point only: the rank installs process-wide state (CPU shims, process groups).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_mel.config import ConfigError
from megatron_mel.platform import free_port, launcher_env


class WorkerFailed(RuntimeError):
    """A spawned worker exited with an error; its message was printed by the worker."""


def already_launched() -> bool:
    """True under torchrun/srun (the ranks exist; run the function in this process)."""
    return launcher_env()[1] > 1 or "RANK" in os.environ


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(*args)`` on ``world_size`` ranks with RANK/WORLD_SIZE/MASTER_* set.

    Under an existing launcher the world size must match. A ConfigError in a worker is printed
    as a one-line ``error:`` by rank 0 and raised here as WorkerFailed.
    """
    if already_launched():
        launched = launcher_env()[1]
        if launched != world_size:
            raise ConfigError(f"launched with {launched} ranks but this job needs {world_size}")
        fn(*args)
        return
    port = free_port()
    if world_size == 1:
        try:
            _worker(0, fn, world_size, port, args)
        except SystemExit as exc:
            if exc.code:
                raise WorkerFailed(f"worker exited with code {exc.code}") from None
        return
    try:
        mp.start_processes(
            _worker,
            args=(fn, world_size, port, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessExitedException as exc:
        raise WorkerFailed(f"worker exited with code {exc.exit_code}") from None
    except mp.ProcessRaisedException as exc:
        raise WorkerFailed(str(exc).strip().splitlines()[-1]) from None


def _worker(local_rank: int, fn: Callable[..., Any], world_size: int, port: int, args: Any) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from megatron_mel.console import setup_console

    setup_console()
    try:
        fn(*args)
    except ConfigError as exc:
        if local_rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
