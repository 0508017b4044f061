"""Disaggregated placement on CPU: a rollout-only "node" runs `megatron-mel serve` (a fake SGLang
server on its own "GPU"), a one-node torchrun trains at PP=2, and each pipeline stage's leader
sends its buckets over its own weight group (gloo standing in for NCCL) to the engine. Two
steps: the engine's weights equal the converter's export at every version, one group per stage
was formed once (no second ``mel-pp0``), and the version was committed once per step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from megatron_mel.platform import free_port
from megatron_mel.rollout.http import HttpError, request_json
from tests.conftest import REPO, run_convert_tool
from tests.e2e.conftest import train_command, train_env
from tests.e2e.test_multinode import _free_block

pytestmark = pytest.mark.slow


def test_stage_leaders_feed_an_engine_on_a_rollout_node(micro_policy, tmp_path):
    run_dir, dumps = tmp_path / "run", tmp_path / "engines"
    dumps.mkdir()
    port = _free_block(4)
    shared = [
        "rollout.engine=sglang", "rollout.placement=disaggregate", "rollout.server.engine_tp=1",
        "rollout.server.num_engines=1", "rollout.server.server_module=tests.fakes.sglang_server",
        f"rollout.server.base_port={port}", "launch.nodes=1", "launch.rollout_nodes=1",
        "launch.gpus_per_node=2", f"model.hf_dir={micro_policy}", f"launch.run_dir={run_dir}",
    ]  # fmt: skip
    env = {**train_env(), "MEL_NODE_HOSTS": "127.0.0.1,127.0.0.1", "MEL_FAKE_DUMP_DIR": str(dumps)}
    serve_cmd = [
        sys.executable,
        "-m",
        "megatron_mel.cli",
        "serve",
        str(REPO / "examples" / "tiny_cpu.yaml"),
        "--node",
        "1",
    ]
    for item in shared:
        serve_cmd += ["--set", item]
    server = subprocess.Popen(
        serve_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                request_json("GET", f"http://127.0.0.1:{port}/health_generate", timeout=5)
                break
            except HttpError:
                assert time.monotonic() < deadline, "the rollout node's server did not come up"
                time.sleep(0.5)
        train = train_command(run_dir, micro_policy, *shared, "parallel.pp=2", "trainer.num_steps=2",
                              "trainer.eval_every=0", "checkpoint.save_every=1")  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--master-port={free_port()}", "-m", "megatron_mel.cli", *train[3:]]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out
    assert f"serving http://127.0.0.1:{port}" in out

    state = json.loads((dumps / f"engine-{port}.json").read_text())
    assert state["commits"] == ["1", "2"]
    assert state["distributed_updates"] >= 4  # >= one bucket per stage per step
    for version in (1, 2):
        export = tmp_path / f"hf-v{version}"
        result = run_convert_tool("mcore-to-hf", "--mcore-dir",
                                  str(run_dir / "checkpoints" / f"step_{version:06d}"),
                                  "--out-dir", str(export))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        hf = {}
        for file in sorted(export.glob("*.safetensors")):
            hf.update(load_file(file))
        served = torch.load(dumps / f"engine-{port}-v{version}.pt")
        assert sorted(served) == sorted(hf)
        assert all(torch.equal(served[n], t) for n, t in hf.items())
