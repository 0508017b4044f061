"""Launching a node's servers: the exact command line, a clean environment, and no server
outliving the rank that started it (the fake server stands in for SGLang)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_mel.config import RolloutConfig, ServerConfig
from megatron_mel.platform import free_port
from megatron_mel.rollout.http import HttpError, request_json
from megatron_mel.rollout.placement import EngineSlot
from megatron_mel.rollout.servers import NodeServers, server_command, server_env
from tests.conftest import REPO, pid_alive


def test_server_command_pins_every_port_and_gpu():
    slot = EngineSlot(index=3, node=1, gpus=(4, 5), host="node1", port=30030)
    cmd = server_command(slot, model_path="/m", module="sglang.launch_server",
                         mem_fraction_static=0.4, colocate=True, seed=9,
                         extra_args=["--dtype", "bfloat16"])  # fmt: skip
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = " ".join(cmd[3:])
    for part in ("--model-path /m", "--tp-size 2", "--mem-fraction-static 0.4",
                 "--host node1", "--port 30030", "--nccl-port 30031", "--base-gpu-id 4",
                 "--random-seed 12", "--skip-server-warmup", "--enable-memory-saver",
                 "--dtype bfloat16"):  # fmt: skip
        assert part in flags
    plain = server_command(slot, model_path="/m", module="m", mem_fraction_static=0.5,
                           colocate=False, seed=0)  # fmt: skip
    assert "--enable-memory-saver" not in plain


def test_server_env_drops_the_launcher_variables():
    base = {"PATH": "/bin", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
            "MASTER_ADDR": "n0", "MASTER_PORT": "29500", "GROUP_RANK": "0",
            "TORCHELASTIC_RUN_ID": "x", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
            "CUDA_VISIBLE_DEVICES": "0,1,2,3"}  # fmt: skip
    env = server_env(colocate=True, base=base)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
                   "SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "RETURN_ORIGINAL_LOGPROB": "1",
                   "SGLANG_MEMORY_SAVER_CUDA_GRAPH": "true"}  # fmt: skip


def _fake_config() -> RolloutConfig:
    return RolloutConfig(
        engine="sglang",
        server=ServerConfig(server_module="tests.fakes.sglang_server", launch_timeout_s=120),
    )


def test_launched_fake_server_sees_a_clean_environment(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.9")
    slot = EngineSlot(index=0, node=0, gpus=(0, 1), host="127.0.0.1", port=free_port())
    servers = NodeServers([slot], _fake_config(), model_path=str(tiny_models["llama"]),
                          seed=0, log_dir=tmp_path)  # fmt: skip
    try:
        assert servers.start() == [slot.url]
        state = request_json("GET", slot.url + "/mel_fake/state", timeout=30)
        assert state["env_rank"] is None and state["env_master_addr"] is None
        assert (state["tp"], state["base_gpu_id"], state["nccl_port"]) == (2, 0, slot.port + 1)
        assert state["memory_saver"] is True  # colocated by default
    finally:
        servers.close()
    with pytest.raises(HttpError, match="refused"):
        request_json("GET", slot.url + "/health_generate", timeout=2)


def test_servers_die_with_the_rank_that_started_them(tiny_models, tmp_path):
    port = free_port()
    script = textwrap.dedent(f"""
        import time
        from megatron_mel.rollout.placement import EngineSlot
        from megatron_mel.rollout.servers import NodeServers
        from tests.unit.test_servers import _fake_config
        slot = EngineSlot(index=0, node=0, gpus=(0,), host="127.0.0.1", port={port})
        servers = NodeServers([slot], _fake_config(), model_path={str(tiny_models["llama"])!r},
                              seed=0, log_dir={str(tmp_path)!r})
        servers.start()
        print(servers.processes[0].pid, flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rank = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        server_pid = int(rank.stdout.readline())
        request_json("GET", f"http://127.0.0.1:{port}/health_generate", timeout=30)
        rank.send_signal(signal.SIGKILL)  # no cleanup code runs in the rank
        rank.wait(timeout=30)
        deadline = time.monotonic() + 30
        while pid_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(server_pid), "the server outlived the rank that started it"
    finally:
        rank.kill()


def test_launched_processes_survive_slurms_sigusr1_warning():
    """Slurm signals every process of the step with SIGUSR1 before the time limit; servers
    started through the bootstrap ignore it (the trainer still needs them for its last step)."""
    from pathlib import Path

    from megatron_mel.rollout.servers import _DIE_WITH_PARENT

    proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()),
                             "/bin/sleep", "30"])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        # Until the bootstrap has exec'd the "server", its Python may not have run yet.
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"/bin/sleep"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
        assert proc.poll() is None, "SIGUSR1 killed the server"
        os.kill(proc.pid, signal.SIGTERM)  # it still stops when asked to
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
