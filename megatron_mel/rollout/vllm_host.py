"""vLLM in a process of its own, driven from the trainer's driver rank.

A ``vllm.LLM`` built inside a torchrun job reuses the job's torch.distributed world: its
``init_distributed_environment`` finds the default group initialised and calls ``new_group``
over all trainer ranks, which only the driver enters, so rank 0 hangs
(vllm/distributed/parallel_state.py, vllm/v1/executor/uniproc_executor.py). So the LLM lives in
a child process with none of the launcher's variables (rollout/servers.py ``server_env``), and
:class:`RemoteLLM` forwards the few calls the engine makes (generate, collective_rpc,
reset_prefix_cache, sleep, wake_up) over a local authenticated connection, serialised by value with
torch.save (a CPU tensor must not turn into a shared-memory handle that outlives its sender). Sampling parameters
travel as keyword dicts and become ``vllm.SamplingParams`` in the child. Weight buckets travel
as CUDA IPC handles (``bucket_payload(..., "ipc")``): the workers map the trainer's buffer and
copy from it while the call is in flight.

The child dies with the process that started it (parent-death signal), like the SGLang servers.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import torch

from megatron_mel.rollout.engine import EngineError

AUTHKEY_ENV = "MEL_VLLM_AUTHKEY"
METHODS = ("generate", "collective_rpc", "reset_prefix_cache", "sleep", "wake_up")


def _dumps(obj: Any) -> bytes:
    """By value, tensors included: torch.save never hands out shared-memory handles, which
    plain pickling does for tensors whose storage is shared."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class RemoteLLM:
    """The ``vllm.LLM`` surface VLLMEngine uses, served by a child process."""

    def __init__(self, proc: subprocess.Popen, conn: Any, log: Path) -> None:
        self.proc, self.conn, self.log = proc, conn, log

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            self.conn.send_bytes(_dumps((method, args, kwargs)))
            status, value = _loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise EngineError("vllm", f"the vLLM process died ({exc}): {_tail(self.log)}") from exc
        if status == "error":
            raise EngineError("vllm", f"{method} failed in the vLLM process: {value}")
        return value

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> Any:
        return self._call("generate", prompts, sampling_params=sampling_params, use_tqdm=use_tqdm)

    def collective_rpc(self, method: str, args: tuple = ()) -> Any:
        return self._call("collective_rpc", method, args=args)

    def reset_prefix_cache(self) -> Any:
        return self._call("reset_prefix_cache")

    def sleep(self, level: int = 1) -> Any:
        return self._call("sleep", level=level)

    def wake_up(self, tags: list[str] | None = None) -> Any:
        return self._call("wake_up", tags=tags)

    def shutdown(self) -> None:
        try:
            self.conn.send_bytes(_dumps(("__shutdown__", (), {})))
            self.conn.close()
            self.proc.wait(timeout=60)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=30)


def spawn_llm(
    llm_kwargs: dict[str, Any],
    *,
    env: dict[str, str],
    log_dir: str | Path | None = None,
    factory: str = "vllm:LLM",
    params_factory: str = "vllm:SamplingParams",
    timeout_s: float = 900.0,
) -> RemoteLLM:
    """Start the child, wait until its LLM is built, and connect to it."""
    from megatron_mel.rollout.servers import _DIE_WITH_PARENT

    logs = Path(log_dir or tempfile.mkdtemp(prefix="mel-vllm-"))
    logs.mkdir(parents=True, exist_ok=True)
    address_file = logs / f"vllm-{os.getpid()}.address"
    address_file.unlink(missing_ok=True)
    key = secrets.token_hex(16)
    cmd = [sys.executable, "-m", "megatron_mel.rollout.vllm_host", "--address-file",
           str(address_file), "--factory", factory, "--params-factory", params_factory,
           "--kwargs", json.dumps(llm_kwargs)]  # fmt: skip
    log = logs / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**env, AUTHKEY_ENV: key})  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not (address_file.is_file() and address_file.read_text().strip()):
        if proc.poll() is not None:
            raise EngineError(
                "vllm", f"the vLLM process exited with {proc.returncode}: {_tail(log)}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise EngineError("vllm", f"vLLM was not ready within {timeout_s}s: {_tail(log)}")
        time.sleep(0.2)
    host, port = address_file.read_text().split()
    return RemoteLLM(proc, Client((host, int(port)), authkey=key.encode()), log)


def serve(llm: Any, params_factory: Any, address_file: Path) -> None:
    """The child's loop: one connection, one call at a time, until told to stop."""
    with Listener(("127.0.0.1", 0), authkey=os.environ[AUTHKEY_ENV].encode()) as listener:
        host, port = listener.address
        address_file.write_text(f"{host} {port}\n")
        conn = listener.accept()
        while True:
            try:
                method, args, kwargs = _loads(conn.recv_bytes())
            except EOFError:
                return
            if method == "__shutdown__":
                return
            if method not in METHODS:
                conn.send_bytes(_dumps(("error", f"unknown method {method!r}")))
                continue
            try:
                if method == "generate" and kwargs.get("sampling_params") is not None:
                    kwargs["sampling_params"] = [
                        params_factory(**p) for p in kwargs["sampling_params"]
                    ]
                answer = ("ok", getattr(llm, method)(*args, **kwargs))
            except Exception as exc:  # the driver raises it as an EngineError
                answer = ("error", f"{type(exc).__name__}: {exc}")
            conn.send_bytes(_dumps(answer))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_mel.rollout.vllm_host")
    parser.add_argument("--address-file", required=True)
    parser.add_argument("--factory", default="vllm:LLM")
    parser.add_argument("--params-factory", default="vllm:SamplingParams")
    parser.add_argument("--kwargs", default="{}")
    args = parser.parse_args(argv)
    llm = _load(args.factory)(**json.loads(args.kwargs))
    try:
        serve(llm, _load(args.params_factory), Path(args.address_file))
    finally:
        engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {log})"


if __name__ == "__main__":
    main()
