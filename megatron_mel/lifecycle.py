"""How a run starts, stops and dies: the one signal handler, parent and peer death, exit codes.

Every rank of a run installs :func:`install_rank_handlers` (``launch.run_workers`` does it, both
for the workers it spawns and for ranks that torchrun/srun started). The launcher that spawns
local workers uses :class:`SignalForwarder` and :func:`die_with_parent` from here too, so this
is the only module that touches signals.

Signals in a rank (SIGTERM, SIGUSR1 and SIGINT alike):

* The first one requests a stop: :func:`stop_requested` turns true at once; the training loop
  calls :func:`agree_to_stop` (a collective) at every step boundary, so all ranks finish the same
  step, write a final checkpoint, mark the MLflow run KILLED and exit with :data:`EXIT_STOPPED`.
* A second one, more than :data:`DUPLICATE_WINDOW_S` after the first, exits at once with
  ``128 + signal number`` (no checkpoint; the last complete one stays valid). Signals inside the
  window count once: a terminal's Ctrl-C reaches every process of its foreground group, and
  launchers (ours, torchrun) forward what they receive.
* No KeyboardInterrupt is ever raised, so Ctrl-C prints no traceback.

The handling runs on a watcher thread woken through ``signal.set_wakeup_fd``: the C-level
handler writes the signal number to a pipe even while the main thread is blocked in a collective
(where a Python-level handler would not run until the collective returns). The same thread
notices a dead parent (the launcher) and a dead peer (the launcher sets an abort event), runs the
registered :func:`on_exit_now` hooks for at most :data:`EXIT_HOOK_TIMEOUT_S` (the tracker marks
its MLflow run), and exits.

Exit codes of ``megatron-mel train`` (docs/operations.md):

    0    finished
    1    failed (a bug, a dead rank, a failed service)
    2    bad configuration or input, or the run directory is locked by another run
    75   stopped on request at a checkpoint (EX_TEMPFAIL): run the same command to resume.
         For Slurm, list it in ``RequeueExit`` (slurm.conf) or requeue on it in the job script.
    128+N  a second signal N arrived: exited at once without a final checkpoint

API for other code (the Slurm integration builds on it): :class:`ShutdownRequest`,
:func:`request_stop` (e.g. a walltime guard), :func:`stop_requested` (local, cheap),
:func:`agree_to_stop` (collective, at a safe point), :class:`RunStopped` (raised after a stop
was honoured; the entry point maps it to :data:`EXIT_STOPPED`), :func:`on_exit_now`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 1.0
EXIT_HOOK_TIMEOUT_S = 5.0
_POLL_S = 0.25
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class ShutdownRequest:
    """A request to stop the run at the next safe point."""

    reason: str
    """``SIGTERM``, ``SIGUSR1``, ``SIGINT``, ``walltime``, or ``another rank``."""
    at: float
    """``time.time()`` when it was requested."""


class RunStopped(Exception):
    """The run stopped at a safe point after a :class:`ShutdownRequest` (a checkpoint is written).

    Entry points exit with :data:`EXIT_STOPPED` on it; its message is the one line to print.
    """

    def __init__(self, request: ShutdownRequest, *, step: int, checkpoint: str | None) -> None:
        self.request, self.step, self.checkpoint = request, step, checkpoint
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(
            f"stopped by {request.reason} after step {step} ({saved}); run the same command "
            f"to resume (exit {EXIT_STOPPED})"
        )


# -- state of this process ----------------------------------------------------------------------

_lock = threading.Lock()
_request: ShutdownRequest | None = None
_first_signal_at: float | None = None
_exit_hooks: list[Callable[[str], Any]] = []
_installed = False
_abort_event: Any = None  # multiprocessing.Event set by our launcher when a peer died
_parent_pid: int | None = None
_graceful = True
_exiting = threading.Event()


def signal_name(signum: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(signum).name
    return f"signal {signum}"


def request_stop(reason: str) -> None:
    """Ask the run to stop at the next safe point (idempotent: the first reason is kept)."""
    global _request
    with _lock:
        if _request is None:
            _request = ShutdownRequest(reason, time.time())


def stop_requested() -> ShutdownRequest | None:
    """The pending request of this process, if any (local: no communication)."""
    return _request


def agree_to_stop() -> ShutdownRequest | None:
    """Collective: a request if any rank has one, else None; every rank must call it.

    Called at the same point of the loop on all ranks (a step boundary), so all of them stop
    after the same step. Without an initialised process group it answers for this process.
    """
    import torch
    import torch.distributed as dist

    from megatron_mel import platform

    if not (dist.is_available() and dist.is_initialized()):
        return _request
    flag = platform.collective_tensor([0 if _request is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return None
    if _request is None:
        request_stop("another rank")
    return _request


def on_exit_now(hook: Callable[[str], Any]) -> None:
    """Register ``hook(status)`` to run before an immediate exit of this process.

    ``status`` is ``KILLED`` (second signal) or ``FAILED`` (a peer rank died). Hooks run on the
    watcher thread while the main thread may be blocked; they get :data:`EXIT_HOOK_TIMEOUT_S` in
    all, so a hung service cannot keep a dying process alive.
    """
    _exit_hooks.append(hook)


def _run_exit_hooks(status: str) -> None:
    def run() -> None:
        for hook in list(_exit_hooks):
            try:
                hook(status)
            except Exception as exc:  # reported, never allowed to block the exit
                print(f"warning: exit hook failed: {exc}", file=sys.stderr, flush=True)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(EXIT_HOOK_TIMEOUT_S)


def exiting_now() -> bool:
    """True once this process has begun an immediate exit (second signal, dead peer/parent)."""
    return _exiting.is_set()


def wait_for_exit() -> None:
    """Block the calling thread until the immediate exit under way ends the process.

    The main thread calls this instead of exiting on its own (with another status, or after
    printing the traceback of an error the exit itself caused, e.g. killed helpers)."""
    while True:
        time.sleep(60)


def _exit_now(code: int, status: str, message: str | None) -> None:
    _exiting.set()
    try:
        if message and _is_rank0():
            with contextlib.suppress(Exception):  # stderr may be a pipe whose reader is gone
                print(message, file=sys.stderr, flush=True)
        _run_exit_hooks(status)
        kill_descendants()  # the verifier pool, megatron's writer Manager, launched servers
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os._exit(code)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


# -- the rank side ----------------------------------------------------------------------------


def install_rank_handlers(
    *, graceful: bool = True, abort_event: Any = None, parent_pid: int | None = None
) -> None:
    """Install the stop handler in this rank (main thread; idempotent).

    ``graceful=False`` is for jobs without safe points (conversion, parity): the first signal
    exits at once. ``abort_event`` (set by our launcher when a peer died) and ``parent_pid``
    (the launcher's pid, watched with PR_SET_PDEATHSIG and a poll) are given only by
    ``launch.run_workers``.
    """
    global _installed, _abort_event, _parent_pid, _graceful
    _graceful = graceful
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("lifecycle.install_rank_handlers must run on the main thread")
    if parent_pid is not None:
        die_with_parent(parent_pid)
        _parent_pid = parent_pid
    _abort_event = abort_event if abort_event is not None else _abort_event
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for signum in STOP_SIGNALS:
        # The Python-level handler only keeps the default action (exit, KeyboardInterrupt) away;
        # the watcher thread reads the signal number from the wakeup fd and acts.
        signal.signal(signum, _ignore_in_main_thread)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="mel-lifecycle", daemon=True).start()
    # Shielded helpers ignore SIGTERM, so multiprocessing's exit handler (which terminates
    # leftover children with SIGTERM, then joins them) would wait for them forever; kill them
    # first. atexit runs last-registered first; spawned workers call kill_descendants instead.
    import multiprocessing.util  # noqa: F401  (registers its exit handler before ours)

    atexit.register(_before_exit)
    _installed = True


def _before_exit() -> None:
    if exiting_now():
        wait_for_exit()
    kill_descendants()


def _ignore_in_main_thread(signum: int, frame: Any) -> None:
    return None


def _watch(read_fd: int) -> None:
    while True:
        ready, _, _ = select.select([read_fd], [], [], _POLL_S)
        signals = os.read(read_fd, 64) if ready else b""
        # Checked before the signals: PR_SET_PDEATHSIG delivers SIGTERM when the launcher dies.
        if _parent_pid is not None and os.getppid() != _parent_pid:
            _exit_now(EXIT_FAILED, "KILLED", "error: the launcher died; its ranks exit with it")
        for signum in signals:
            if signum in STOP_SIGNALS:
                _on_signal(signum)
        if _abort_event is not None and _abort_event.is_set():
            _exit_now(EXIT_FAILED, "FAILED", None)  # the launcher prints which rank died


def _on_signal(signum: int) -> None:
    global _first_signal_at
    now = time.monotonic()
    name = signal_name(signum)
    if not _graceful:
        _exit_now(128 + signum, "KILLED", f"{name}: exiting now")
    if _first_signal_at is None:
        _first_signal_at = now
        request_stop(name)
        if _is_rank0():
            print(
                f"{name}: stopping after the current step with a final checkpoint "
                f"(send it again to exit at once, without one)",
                file=sys.stderr,
                flush=True,
            )
        return
    if now - _first_signal_at <= DUPLICATE_WINDOW_S:
        return  # the same request, delivered twice (process group + forwarding launcher)
    _exit_now(128 + signum, "KILLED", f"{name} again: exiting now without a final checkpoint")


@contextlib.contextmanager
def shielded_children() -> Iterator[None]:
    """Processes started inside this block never receive the stop signals.

    For helper processes the rank stops itself (the verifier pool): a terminal's Ctrl-C, a
    ``killpg`` by torchrun or a ``scancel`` would otherwise kill them in the middle of the last
    step (or make them print a KeyboardInterrupt traceback each). The signals are blocked in the
    calling thread for the block, and children inherit the mask; the rank itself misses nothing,
    because the watcher thread keeps them unblocked and receives them meanwhile. Do not start
    processes that must answer SIGTERM (SGLang or vLLM servers) inside it: shielded ones are
    stopped by their owner, or with SIGKILL by :func:`kill_descendants` when the rank exits.
    """
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def die_with_parent(parent_pid: int) -> None:
    """Exit when ``parent_pid`` (this process's parent) dies, however it dies.

    Linux: PR_SET_PDEATHSIG has the kernel send SIGTERM the moment the parent exits; the
    watcher thread of :func:`install_rank_handlers` sees the parent gone, kills this rank's own
    children and exits at once (SIGKILL would leave those children behind). The watcher also
    polls the parent pid, which covers other systems and a parent that died before this call.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(EXIT_FAILED)  # the parent is already gone


def adopt_orphans() -> None:
    """Make this process (a launcher) the reaper of its descendants' orphans (Linux), so that
    :func:`kill_descendants` still finds the helpers of a worker that was SIGKILLed."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def kill_descendants(*, spare: Iterable[int] = ()) -> int:
    """SIGKILL every descendant of this process but ``spare`` (whole process groups for group
    leaders, e.g. servers started in their own session) and reap them; return how many."""
    import psutil

    spared = set(spare)
    tracker = getattr(_resource_tracker(), "_pid", None)
    kids = [k for k in psutil.Process().children(recursive=True) if k.pid not in spared | {tracker}]
    own_group = os.getpgid(0)
    for kid in kids:
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(kid.pid) == kid.pid != own_group:
                os.killpg(kid.pid, signal.SIGKILL)
            else:
                kid.kill()
    psutil.wait_procs(kids, timeout=5)
    return len(kids)


def _resource_tracker() -> Any:
    from multiprocessing import resource_tracker

    return resource_tracker._resource_tracker


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        log.warning("prctl(%d, %d) failed: errno %d", option, value, ctypes.get_errno())


# -- the launcher side ------------------------------------------------------------------------


class SignalForwarder:
    """In a launcher: pass SIGTERM/SIGINT/SIGUSR1 on to the workers instead of dying.

    Used as a context manager around the supervision loop; the previous handlers come back on
    exit. Every delivery is forwarded (the ranks count repeats themselves); ``first`` holds the
    first signal number, so the launcher knows its workers' exit codes were asked for.
    """

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._saved: dict[int, Any] = {}
        self.first: int | None = None

    def __enter__(self) -> SignalForwarder:
        for signum in STOP_SIGNALS:
            self._saved[signum] = signal.signal(signum, self._forward)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        if self.first is None:
            self.first = signum
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
