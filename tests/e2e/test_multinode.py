"""Two "nodes" on one host: two torchruns (``--nnodes 2``, node ranks 0 and 1) run TP=2 x PP=2 on
four gloo ranks, and each node's local rank 0 starts that node's own (fake) SGLang server on its
two "GPUs". Two steps, colocated, with the memory hand-off. Afterwards, for every engine:

* its weights at each version equal the converter's HF export of the checkpoint, bit for bit;
* every bucket it received came from the training ranks of its own node, entry i from the rank
  on its GPU i (CUDA IPC never crosses a node);
* the version was committed exactly once per step, after a complete load;
* it released and resumed its memory every step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_mel.platform import free_port
from tests.conftest import REPO, run_convert_tool
from tests.e2e.conftest import train_command, train_env

pytestmark = pytest.mark.slow


def _free_block(count: int) -> int:
    """A base port with ``count`` consecutive free ports after it."""
    for base in range(20000, 32000, 97):
        try:
            socks = []
            for port in range(base, base + count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port block")


def _node_command(run_dir, policy, node: int, master_port: int, overrides: list[str]) -> list[str]:
    train = train_command(run_dir, policy, *overrides)
    assert train[:3] == [sys.executable, "-m", "megatron_mel.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
            "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={master_port}",
            "-m", "megatron_mel.cli", *train[3:]]  # fmt: skip


def test_two_nodes_each_feed_their_own_engine(micro_policy, tmp_path):
    run_dir, dumps = tmp_path / "run", tmp_path / "engines"
    dumps.mkdir()
    base_port = _free_block(12)
    overrides = [
        "parallel.tp=2", "parallel.pp=2", "rollout.engine=sglang", "rollout.placement=colocate",
        "rollout.server.engine_tp=2", "rollout.server.server_module=tests.fakes.sglang_server",
        f"rollout.server.base_port={base_port}", "rollout.server.launch_timeout_s=300",
        "trainer.num_steps=2", "trainer.eval_every=0", "checkpoint.save_every=1",
        "checkpoint.keep_last=2",
    ]  # fmt: skip
    env = {**train_env(), "MEL_NODE_HOSTS": "127.0.0.1,127.0.0.1", "MEL_FAKE_DUMP_DIR": str(dumps)}
    master_port = free_port()  # ephemeral range, above the engines' block
    procs = [
        subprocess.Popen(_node_command(run_dir, micro_policy, node, master_port, overrides),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=1200)[0])
    finally:
        for proc in procs:
            proc.kill()
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} failed ({proc.returncode}):\n{out[-6000:]}"

    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["sync/weight_version"] for m in steps] == [1.0, 2.0]
    assert all("time/release" in m and "time/resume" in m for m in steps)
    assert all(m["sync/verified_tensors"] > 0 for m in steps)  # verify mode compared them too

    engines = {0: base_port, 1: base_port + 10}  # engine i on node i (one per node)
    for version in (1, 2):
        export = tmp_path / f"hf-v{version}"
        result = run_convert_tool("mcore-to-hf", "--mcore-dir",
                                  str(run_dir / "checkpoints" / f"step_{version:06d}"),
                                  "--out-dir", str(export))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        hf = {}
        for file in sorted(export.glob("*.safetensors")):
            hf.update(load_file(file))
        for node, port in engines.items():
            served = torch.load(dumps / f"engine-{port}-v{version}.pt")
            assert sorted(served) == sorted(hf)
            for name, tensor in hf.items():
                assert torch.equal(served[name], tensor), (node, version, name)

    for node, port in engines.items():
        state = json.loads((dumps / f"engine-{port}.json").read_text())
        assert state["tp"] == 2 and state["base_gpu_id"] == 0 and state["env_rank"] is None
        assert state["commits"] == ["1", "2"]  # once per step, after every stage's buckets
        assert state["sessions"] == 2
        assert state["tensor_updates"], "no bucket reached the engine"
        own_ranks = [2 * node, 2 * node + 1]
        for update in state["tensor_updates"]:
            assert [s["rank"] for s in update["senders"]] == own_ranks
        assert len(state["releases"]) == 2 and all(r["bytes"] > 0 for r in state["releases"])
        assert [r["tags"] for r in state["resumes"]] == [
            ["weights"],
            ["kv_cache", "cuda_graph"],
        ] * 2
    assert os.path.isdir(run_dir / "engine_logs")
    assert not (REPO / "engine_logs").exists()
