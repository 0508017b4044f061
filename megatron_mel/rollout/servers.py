"""Starting and stopping one node's rollout servers (SGLang, or a fake speaking its routes).

The placement (rollout/placement.py) says which engines live on a node; that node's launcher
(local rank 0 of its training ranks, or ``megatron-mel serve`` on a rollout-only node) starts
them with :class:`NodeServers` and stops them when the run ends. Each server:

* is ``python -m <rollout.server.server_module>`` with explicit ``--host``/``--port`` from the
  placement, ``--nccl-port`` right after its HTTP port (SGLang would otherwise pick a random one
  at startup, racing other servers started at the same moment), ``--base-gpu-id`` of its first
  GPU on the node and ``--tp-size`` GPUs;
* gets an environment without the torchrun/torchelastic variables of the rank that starts it
  (RANK, WORLD_SIZE, MASTER_ADDR, ...: an inherited MASTER_ADDR/PORT wins over SGLang's own
  rendezvous settings), with unscaled log-probs switched on and no expandable-segments
  allocator (SGLang's memory saver and CUDA IPC need plain allocations);
* runs in its own session, so stopping it stops its scheduler processes too, and dies with
  the process that started it (Linux parent-death signal), so no server outlives a killed run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_mel.config import RolloutConfig
from megatron_mel.rollout.engine import EngineError
from megatron_mel.rollout.http import HttpError, request_json
from megatron_mel.rollout.placement import EngineSlot

ORIGINAL_LOGPROB_ENV = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip
LAUNCHER_PREFIXES = ("TORCHELASTIC_",)

# Sets the parent-death signal, then becomes the server: prctl survives execve. SIGUSR1 is
# ignored (an ignored disposition survives execve too): Slurm delivers it to every process of a
# job step as the time-limit warning (slurm/launch.sh), and it asks the trainer to finish its
# step with a checkpoint, which needs its servers; by default it would kill them.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent is already gone\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def server_env(colocate: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched server (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key in LAUNCHER_ENV or key.startswith(LAUNCHER_PREFIXES):
            del env[key]
    for key in ORIGINAL_LOGPROB_ENV:
        env[key] = "1"
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env.pop("PYTORCH_ALLOC_CONF", None)
    if colocate:
        env["SGLANG_MEMORY_SAVER_CUDA_GRAPH"] = "true"  # CUDA graphs released with the KV cache
    return env


def server_command(
    slot: EngineSlot,
    *,
    model_path: str,
    module: str,
    mem_fraction_static: float,
    colocate: bool,
    seed: int,
    deterministic: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``python -m <module>`` with the flags an RL engine needs."""
    cmd = [
        sys.executable, "-m", module,
        "--model-path", str(model_path),
        "--tp-size", str(slot.tp),
        "--mem-fraction-static", str(mem_fraction_static),
        "--host", slot.host,
        "--port", str(slot.port),
        "--nccl-port", str(slot.nccl_port),
        "--base-gpu-id", str(slot.base_gpu_id),
        "--random-seed", str(seed + slot.index),
        "--skip-server-warmup",
    ]  # fmt: skip
    if colocate:
        cmd.append("--enable-memory-saver")  # release/resume_memory_occupation need it
    if deterministic:
        cmd.append("--enable-deterministic-inference")  # batch-invariant ops + sampling_seed
    return cmd + list(extra_args)


class NodeServers:
    """The servers of ``slots`` (all on this node): start, wait until healthy, stop."""

    def __init__(
        self,
        slots: Sequence[EngineSlot],
        rollout: RolloutConfig,
        *,
        model_path: str,
        seed: int,
        log_dir: str | Path,
    ) -> None:
        self.slots = list(slots)
        self.rollout = rollout
        self.model_path = model_path
        self.seed = seed
        self.log_dir = Path(log_dir)
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.slots]

    def start(self) -> list[str]:
        """Launch every server, then wait for all of them (``rollout.server.launch_timeout_s``)."""
        if self.rollout.server.server_module == "sglang.launch_server":
            from megatron_mel.rollout.sglang_weights import import_or_explain, require_cuda

            require_cuda("SGLang rollout")
            import_or_explain("sglang", "SGLang rollout")
        cfg, colocate = self.rollout.server, self.rollout.placement == "colocate"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for slot in self.slots:
                cmd = server_command(
                    slot, model_path=self.model_path, module=cfg.server_module,
                    mem_fraction_static=cfg.mem_fraction_static, colocate=colocate,
                    seed=self.seed, extra_args=cfg.extra_server_args,
                )  # fmt: skip
                log = self.log_dir / f"engine-{slot.index}.log"
                with open(log, "wb") as out:
                    wrapped = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
                    proc = subprocess.Popen(
                        wrapped, stdout=out, stderr=subprocess.STDOUT,
                        env=server_env(colocate), start_new_session=True,
                    )  # fmt: skip
                self.processes.append(proc)
                self.logs.append(log)
            deadline = time.monotonic() + cfg.launch_timeout_s
            for slot, proc, log in zip(self.slots, self.processes, self.logs):
                wait_ready(slot.url, deadline, proc=proc, log=log)
        except BaseException:
            self.close()
            raise
        return self.urls

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: server + schedulers
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.processes.clear()


def wait_ready(
    url: str,
    deadline: float,
    *,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    probe_timeout_s: float = 30.0,
) -> None:
    """Poll ``/health_generate`` until it answers, the process exits, or ``deadline`` passes."""
    delay = 0.5
    while True:
        if proc is not None and proc.poll() is not None:
            raise EngineError(url, f"server exited with {proc.returncode}: {_tail(log)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EngineError(url, f"not healthy before the launch timeout: {_tail(log)}")
        try:
            request_json("GET", url + "/health_generate", timeout=min(remaining, probe_timeout_s))
            return
        except HttpError:
            time.sleep(min(delay, max(remaining, 0.0)))
            delay = min(2 * delay, 5.0)


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None:
        return "(no log)"
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {log})"
