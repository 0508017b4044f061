"""Placement: training ranks and engines on nodes and GPUs, from a topology (pure)."""

from __future__ import annotations

import pytest

from megatron_mel.config import LaunchConfig
from megatron_mel.errors import ConfigError
from megatron_mel.rollout.placement import (
    Topology,
    check_rank_table,
    node_hosts,
    plan_layout,
    topology_from_env,
)

HOSTS8 = tuple(f"node{i}" for i in range(8))


def _layout(topology: Topology, **kwargs):
    kwargs.setdefault("mode", "colocate")
    kwargs.setdefault("engine_tp", 8)
    kwargs.setdefault("num_engines", None)
    kwargs.setdefault("base_port", 30000)
    return plan_layout(topology, **kwargs)


def test_70b_colocated_one_engine_per_node_on_real_gpus():
    layout = _layout(Topology(train_nodes=8, ranks_per_node=8, gpus_per_node=8, hosts=HOSTS8))
    assert len(layout.ranks) == 64 and len(layout.engines) == 8
    for engine in layout.engines:
        assert engine.node == engine.index and engine.gpus == tuple(range(8))
        assert all(0 <= g < 8 for g in engine.gpus)  # a real GPU of a real node
        assert engine.url == f"http://node{engine.node}:{30000 + 10 * engine.index}"
        # CUDA IPC never crosses a node: the ranks feeding an engine live on its node, one per
        # engine TP rank, in TP-rank order.
        ranks = layout.engine_ranks(engine)
        assert ranks == tuple(range(8 * engine.node, 8 * engine.node + 8))
        assert layout.launcher_rank(engine.node) == 8 * engine.node
    assert len({(e.host, e.port) for e in layout.engines}) == 8


def test_colocated_several_engines_per_node_and_round_robin():
    topo = Topology(train_nodes=2, ranks_per_node=8, gpus_per_node=8, hosts=("a", "b"))
    full = _layout(topo, engine_tp=2)
    assert len(full.engines) == 8
    assert [(e.node, e.gpus) for e in full.engines[:4]] == [
        (0, (0, 1)), (1, (0, 1)), (0, (2, 3)), (1, (2, 3)),
    ]  # fmt: skip
    assert full.engine_ranks(full.engines[3]) == (10, 11)
    few = _layout(topo, engine_tp=4, num_engines=2)
    assert [(e.node, e.gpus) for e in few.engines] == [(0, (0, 1, 2, 3)), (1, (0, 1, 2, 3))]


def test_disaggregated_on_rollout_nodes_and_on_spare_gpus():
    topo = Topology(train_nodes=4, ranks_per_node=8, gpus_per_node=8, rollout_nodes=4, hosts=HOSTS8)
    layout = _layout(topo, mode="disaggregate")
    assert [e.node for e in layout.engines] == [4, 5, 6, 7]
    assert all(layout.engine_ranks(e) == () for e in layout.engines)  # weights over NCCL
    assert layout.rollout_only_nodes == (4, 5, 6, 7)
    assert layout.launcher_rank(5) is None  # started by `megatron-mel serve` there
    spare = _layout(
        Topology(train_nodes=1, ranks_per_node=4, gpus_per_node=8),
        mode="disaggregate",
        engine_tp=2,
    )
    assert [e.gpus for e in spare.engines] == [(4, 5), (6, 7)]
    assert spare.engines[0].url == "http://127.0.0.1:30000"  # one node: loopback


@pytest.mark.parametrize(
    ("topology", "kwargs", "message"),
    [
        (Topology(8, 8, 8, hosts=HOSTS8), {"engine_tp": 3}, "must divide launch.gpus_per_node=8"),
        (Topology(8, 8, 8, hosts=HOSTS8), {"num_engines": 9}, "room for 8 engine"),
        (Topology(1, 8, 8), {"mode": "disaggregate"}, "needs spare GPUs"),
        (Topology(2, 4, 4), {"engine_tp": 4}, "needs each node's address"),
        (Topology(1, 4, 2), {"engine_tp": 1}, "need a GPU each"),
        (Topology(1, 2, 2, rollout_nodes=1, hosts=("a", "b")), {"engine_tp": 1}, "colocated"),
        (Topology(1, 2, 4), {"engine_tp": 4}, "must divide the 2 training ranks"),
    ],
)
def test_refusals_name_the_key(topology, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _layout(topology, **kwargs)


def test_describe_lists_every_node_and_engine():
    layout = _layout(Topology(2, 2, 2, hosts=("h0", "h1")), engine_tp=2)
    text = layout.describe()
    assert "node 0 (h0): ranks 0-1 on GPUs 0-1; engine 0 on GPUs 0-1" in text
    assert "engine 1: http://h1:30010 tp=2 base_gpu_id=0; weights from ranks [2, 3]" in text


def test_topology_from_torchrun_srun_and_plain_starts():
    launch = LaunchConfig()
    torchrun = {"WORLD_SIZE": "16", "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "8",
                "MEL_NODE_HOSTS": "a,b", "RANK": "3"}  # fmt: skip
    topo = topology_from_env(launch, torchrun, cuda_devices=8)
    assert (topo.train_nodes, topo.ranks_per_node, topo.gpus_per_node) == (2, 8, 8)
    assert topo.hosts == ("a", "b")
    srun = {"SLURM_NNODES": "3", "SLURM_NTASKS": "4", "MEL_NODE_HOSTS": "a,b,c"}
    topo = topology_from_env(LaunchConfig(rollout_nodes=1), srun, cuda_devices=0)
    assert (topo.train_nodes, topo.ranks_per_node, topo.rollout_nodes) == (2, 2, 1)
    assert topo.gpus_per_node == 2  # CPU: one slot per rank
    spawned = topology_from_env(launch, {"WORLD_SIZE": "4", "RANK": "0"}, cuda_devices=0)
    assert (spawned.train_nodes, spawned.ranks_per_node) == (1, 4)
    assert topology_from_env(launch, {}, cuda_devices=0).world_size == 1
    with pytest.raises(ConfigError, match=r"launch.nodes=4 but the job was launched on 2"):
        topology_from_env(LaunchConfig(nodes=4), torchrun, cuda_devices=8)
    with pytest.raises(ConfigError, match="this node has 8 GPUs"):
        topology_from_env(LaunchConfig(gpus_per_node=4), torchrun, cuda_devices=8)
    with pytest.raises(ConfigError, match="MEL_NODE_HOSTS"):
        node_hosts(3, {"MEL_NODE_HOSTS": "a,b"})


def test_rank_table_must_match_the_numbering():
    layout = _layout(Topology(2, 2, 2, hosts=("a", "b")), engine_tp=2)
    check_rank_table(layout, [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)])
    with pytest.raises(
        ConfigError,
        match=r"rank 1 runs on node 1 as local rank 0, but the placement expects \(0, 1\)",
    ):
        check_rank_table(layout, [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
