"""Run a function on N local worker processes, or on the ranks a launcher already started.

Training and tools such as checkpoint conversion are "one command": under ``torchrun``/``srun``
they run on the launched ranks; started plainly, they spawn ``world_size`` local workers (gloo on
CPU, one GPU each with CUDA) and supervise them. The worker function must be importable (module
level), and scripts that call this need an ``if __name__ == "__main__":`` guard (spawn).

Supervision (signals themselves are handled in megatron_mel/lifecycle.py):

* SIGTERM/SIGINT/SIGUSR1 sent to the launcher are forwarded to every worker, which stops at the
  next safe point; the launcher waits for them and exits with their status.
* Workers die with the launcher (PR_SET_PDEATHSIG + a parent-pid poll), however it is killed.
* A worker that dies from a signal (the OOM killer's SIGKILL, a segfault) makes the launcher
  print one line naming the rank and the signal and stop every other rank: they get an abort
  event (their tracker marks the MLflow run FAILED), and whatever is left after
  ``ABORT_GRACE_S`` is killed. A worker that exits with an error gets the same treatment after
  ``FAILURE_GRACE_S`` (the others usually fail with it, having received the error).
* Each worker reports its outcome over a pipe; the launcher prints one line for the run: the
  error of the lowest failing rank (a traceback only for an unexpected exception).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from megatron_mel import lifecycle
from megatron_mel.config import ConfigError
from megatron_mel.platform import free_port, launcher_env

ABORT_GRACE_S = 10.0
FAILURE_GRACE_S = 20.0
_REPORT_CHARS = 20_000


class WorkerFailed(RuntimeError):
    """The workers did not all finish; the one-line reason was printed by the launcher."""

    def __init__(self, message: str, exit_code: int = lifecycle.EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def already_launched() -> bool:
    """True under torchrun/srun (the ranks exist; run the function in this process)."""
    return launcher_env()[1] > 1 or "RANK" in os.environ


def run_id() -> str:
    """A name shared by every rank of this job (for scratch paths all ranks must agree on)."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return env.get("MEGATRON_MEL_JOB") or env.get("TORCHELASTIC_RUN_ID") or str(os.getpid())


def run_workers(
    fn: Callable[..., Any] | str, world_size: int, *args: Any, graceful_stop: bool = False
) -> None:
    """Call ``fn(*args)`` on ``world_size`` ranks with RANK/WORLD_SIZE/MASTER_* set.

    ``fn`` may be named ``"package.module:function"``, so the launcher need not import it.
    ``graceful_stop``: ``fn`` honours stop requests at safe points (lifecycle.agree_to_stop),
    so the first SIGTERM/SIGUSR1/SIGINT asks for a stop; otherwise it exits at once.

    Under an existing launcher the world size must match and ``fn`` runs here, with the stop
    handler installed. Spawned, a failure raises WorkerFailed (its line already printed), and a
    honoured stop request raises lifecycle.RunStopped.
    """
    if already_launched():
        launched = launcher_env()[1]
        if launched != world_size:
            raise ConfigError(f"launched with {launched} ranks but this job needs {world_size}")
        lifecycle.install_rank_handlers(graceful=graceful_stop)
        _resolve(fn)(*args)
        return
    ctx = mp.get_context("spawn")
    abort = ctx.Event()
    port, job = free_port(), run_id()
    workers: list[_Handle] = []
    for rank in range(world_size):
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker,
            args=(rank, world_size, port, job, os.getpid(), abort, send, fn, args, graceful_stop),
            name=f"rank{rank}",
        )
        workers.append(_Handle(rank, process, receive, send))

    def alive() -> list[int]:
        return [w.process.pid for w in workers if w.process.pid and w.process.exitcode is None]

    lifecycle.adopt_orphans()
    with lifecycle.SignalForwarder(alive) as forwarder:
        try:
            for handle in workers:
                handle.process.start()
                handle.sender.close()  # the child holds its own copy; EOF here: it is gone
            _supervise(workers, abort, forwarder)
        finally:
            # Nothing outlives the run: helpers orphaned by a dead worker were adopted here.
            lifecycle.kill_descendants()
    _conclude(workers, forwarder)


@dataclass
class _Handle:
    rank: int
    process: Any
    reports: Connection
    sender: Connection
    report: tuple[str, str] | None = None

    def read(self) -> None:
        if self.reports.closed:
            return
        try:
            while self.reports.poll():
                self.report = self.reports.recv()
        except (EOFError, OSError):
            self.reports.close()


def _supervise(workers: list[_Handle], abort: Any, forwarder: lifecycle.SignalForwarder) -> None:
    """Wait for every worker; stop the rest when one dies (see the module docstring)."""
    kill_at: float | None = None
    abort_at: float | None = None
    while any(w.process.exitcode is None for w in workers):
        waitables = [w.process.sentinel for w in workers if w.process.exitcode is None]
        waitables += [w.reports for w in workers if not w.reports.closed]
        wait(waitables, timeout=0.5)
        now = time.monotonic()
        for handle in workers:
            handle.read()
            code = handle.process.exitcode
            if code is None or code in (0, lifecycle.EXIT_STOPPED):
                continue
            if code < 0 and kill_at is None:  # killed by a signal: the others cannot go on
                abort.set()
                kill_at = now + ABORT_GRACE_S
                if not _asked_for(-code, forwarder):  # not a stop signal that reached it early
                    _say(_death_message(handle, code))
            elif code > 0 and abort_at is None:
                abort_at = now + FAILURE_GRACE_S
        if abort_at is not None and now > abort_at and kill_at is None:
            abort.set()
            kill_at = now + ABORT_GRACE_S
        if kill_at is not None and now > kill_at:
            for handle in workers:
                if handle.process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(handle.process.pid, signal.SIGKILL)
    for handle in workers:
        handle.process.join()
        handle.read()


def _asked_for(signum: int, forwarder: lifecycle.SignalForwarder) -> bool:
    """A worker killed by a stop signal the launcher received (before its handler was set)."""
    return forwarder.first is not None and signum in lifecycle.STOP_SIGNALS


def _death_message(handle: _Handle, code: int) -> str:
    name = lifecycle.signal_name(-code)
    hint = {
        "SIGKILL": "the kernel's OOM killer sends SIGKILL when memory runs out; see `dmesg`",
        "SIGSEGV": "a segmentation fault in native code",
        "SIGBUS": "a bus error, often a truncated memory-mapped file or a full /dev/shm",
        "SIGABRT": "an abort in native code",
    }.get(name, "killed from outside")
    return (
        f"error: rank {handle.rank} (pid {handle.process.pid}) died from {name} ({hint}); "
        "stopping the other ranks"
    )


def _conclude(workers: list[_Handle], forwarder: lifecycle.SignalForwarder) -> None:
    """Raise for anything but a clean finish, after printing the run's one line."""
    codes = [w.process.exitcode for w in workers]
    if all(code == 0 for code in codes):
        return
    signalled = [128 - c if c < 0 else c for c in codes if c is not None and (c < 0 or c > 128)]
    at_once = [c for c in signalled if _asked_for(c - 128, forwarder)]
    if at_once:  # the ranks said so as they exited (or died of it before they could)
        raise WorkerFailed("stopped at once by a signal", at_once[0])
    if any(code is not None and code < 0 for code in codes):
        raise WorkerFailed("a rank died")  # its line was printed when it happened
    failing = [
        (w.rank, w.report)
        for w in workers
        if w.process.exitcode not in (0, None, lifecycle.EXIT_STOPPED)
    ]
    if not failing:  # every rank stopped on request (ranks that had finished exit 0)
        _, message = workers[0].report or ("stopped", "stopped on request")
        _say(message)
        raise WorkerFailed(message, lifecycle.EXIT_STOPPED)
    rank, report = next(((r, rep) for r, rep in failing if rep is not None), (failing[0][0], None))
    if report is None:
        message = f"error: rank {rank} exited with code {codes[rank]} without a report"
        code = lifecycle.EXIT_FAILED
    else:
        kind, message = report
        code = lifecycle.EXIT_USAGE if kind == "error" else lifecycle.EXIT_FAILED
        if kind == "crash":
            _say(message.rstrip())
            message = f"error: rank {rank} failed with the exception above"
        elif rank != 0:
            message = message.replace("error: ", f"error: rank {rank}: ", 1)
    _say(message)
    raise WorkerFailed(message, code)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    job: str,
    parent_pid: int,
    abort: Any,
    report: Connection,
    fn: Callable[..., Any] | str,
    args: Any,
    graceful: bool,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MEGATRON_MEL_JOB=job,
        MEGATRON_MEL_LAUNCHER_PID=str(parent_pid),
    )
    lifecycle.install_rank_handlers(graceful=graceful, abort_event=abort, parent_pid=parent_pid)
    from megatron_mel.console import setup_console

    setup_console()
    try:
        _resolve(fn)(*args)
    except lifecycle.RunStopped as exc:
        _report_and_exit(report, "stopped", str(exc), lifecycle.EXIT_STOPPED)
    except ConfigError as exc:
        _report_and_exit(report, "error", f"error: {exc}", lifecycle.EXIT_USAGE)
    except BaseException as exc:
        if lifecycle.exiting_now():  # caused by the immediate exit under way (killed helpers)
            lifecycle.wait_for_exit()
        # A peer that died makes collectives fail here too; the launcher reports the death.
        if abort.wait(3.0):
            lifecycle.kill_descendants()
            os._exit(lifecycle.EXIT_FAILED)
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            _report_and_exit(report, "ok", "", 0)
        text = traceback.format_exc()[-_REPORT_CHARS:]
        _report_and_exit(report, "crash", text, lifecycle.EXIT_FAILED)
    _report_and_exit(report, "ok", "", 0)


def _resolve(fn: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(fn):
        return fn
    import importlib

    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def _report_and_exit(report: Connection, kind: str, message: str, code: int) -> None:
    if lifecycle.exiting_now():  # the watcher thread is ending the process with its own status
        lifecycle.wait_for_exit()
    with contextlib.suppress(OSError):
        report.send((kind, message))
        report.close()
    # Helpers this rank did not stop (an error before its cleanup ran) must not keep it alive.
    lifecycle.kill_descendants()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)
