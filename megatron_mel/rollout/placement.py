"""Placement: which training rank and which rollout engine runs on which node and GPUs.

One pure function, :func:`plan_layout`, maps the run's config and the launcher's view of the
job (:class:`Topology`) to a :class:`Layout`; the loop, the launcher, weight sync and
``megatron-mel plan`` all read that one answer. Nothing here starts a process.

    colocate       engines share the training GPUs. Every training node holds
                   gpus_per_node / engine_tp engine slots; engine k on a node spans GPUs
                   [k*tp, (k+1)*tp), the GPUs of local ranks k*tp ... (k+1)*tp - 1. Engines fill
                   the nodes round-robin, so fewer engines than slots still spread out.
    disaggregate   engines own their GPUs: dedicated rollout nodes (``launch.rollout_nodes`` > 0,
                   the nodes after the training nodes), or, with no rollout nodes, the GPUs of
                   each training node beyond its training ranks (gpus_per_node > ranks per node).

Engine ports are unique per engine across the whole job (``base_port + 10 * engine index``,
with the server's NCCL port right after it), so several "nodes" on one host never collide.
A server binds to its node's address (loopback on a one-node job, see :func:`node_hosts`).

Ranks: torchrun numbers a node's ranks contiguously, global rank = node * ranks_per_node +
local rank, and local rank r drives GPU r; :func:`check_rank_table` verifies that at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from megatron_mel.config import LaunchConfig, RolloutConfig, RunConfig
from megatron_mel.errors import ConfigError

Mode = Literal["colocate", "disaggregate"]
PORT_STRIDE = 10  # ports per engine: HTTP, NCCL, and room for what a server opens beside them
HOSTS_ENV = "MEL_NODE_HOSTS"
"""Comma-separated address of every node of the job, in node order (slurm/launch.sh sets it)."""


@dataclass(frozen=True, slots=True)
class Topology:
    """The job as the launcher started it: ``train_nodes`` nodes with ``ranks_per_node``
    training processes each, on nodes of ``gpus_per_node`` GPUs; ``rollout_nodes`` more nodes
    (no training processes) for disaggregated engines."""

    train_nodes: int
    ranks_per_node: int
    gpus_per_node: int
    rollout_nodes: int = 0
    hosts: tuple[str, ...] = ()
    """Address of every node (train nodes first); empty = loopback for a one-node job."""

    @property
    def num_nodes(self) -> int:
        return self.train_nodes + self.rollout_nodes

    @property
    def world_size(self) -> int:
        return self.train_nodes * self.ranks_per_node


@dataclass(frozen=True, slots=True)
class TrainRank:
    rank: int
    node: int
    local_rank: int
    gpu: int


@dataclass(frozen=True, slots=True)
class EngineSlot:
    """One rollout engine: a server of ``len(gpus)``-way tensor parallelism on one node."""

    index: int
    node: int
    gpus: tuple[int, ...]
    host: str
    port: int

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def base_gpu_id(self) -> int:
        return self.gpus[0]

    @property
    def nccl_port(self) -> int:
        """The server's own TP group rendezvous (SGLang ``--nccl-port``)."""
        return self.port + 1

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Layout:
    mode: Mode
    topology: Topology
    ranks: tuple[TrainRank, ...]
    engines: tuple[EngineSlot, ...]

    def engines_on(self, node: int) -> tuple[EngineSlot, ...]:
        return tuple(e for e in self.engines if e.node == node)

    def engine_ranks(self, engine: EngineSlot) -> tuple[int, ...]:
        """Global ranks of the training processes on ``engine``'s GPUs, in engine TP-rank order
        (colocate: every GPU of an engine is a training GPU; empty for engines on own GPUs)."""
        on_node = {r.gpu: r.rank for r in self.ranks if r.node == engine.node}
        return tuple(on_node[g] for g in engine.gpus if g in on_node)

    def launcher_rank(self, node: int) -> int | None:
        """The training rank that starts ``node``'s servers (its local rank 0), if any."""
        return next((r.rank for r in self.ranks if r.node == node and r.local_rank == 0), None)

    def engines_on_rollout_nodes(self) -> tuple[EngineSlot, ...]:
        """Engines on nodes without training ranks (their servers come from `megatron-mel serve`)."""
        return tuple(e for e in self.engines if e.node >= self.topology.train_nodes)

    @property
    def rollout_only_nodes(self) -> tuple[int, ...]:
        t = self.topology
        return tuple(range(t.train_nodes, t.num_nodes))

    def describe(self) -> str:
        """The layout as text: one line per node, then one per engine."""
        t = self.topology
        lines = [
            f"placement {self.mode}: {t.train_nodes} training node(s) x {t.ranks_per_node} "
            f"rank(s), {t.rollout_nodes} rollout node(s), {t.gpus_per_node} GPU(s) per node, "
            f"{len(self.engines)} engine(s)"
        ]
        for node in range(t.num_nodes):
            ranks = [r for r in self.ranks if r.node == node]
            span = (
                f"ranks {ranks[0].rank}-{ranks[-1].rank} on GPUs 0-{ranks[-1].gpu}"
                if ranks
                else "no training ranks"
            )
            engines = ", ".join(
                f"engine {e.index} on GPUs {_span(e.gpus)}" for e in self.engines_on(node)
            )
            lines.append(f"  node {node} ({_host(t, node)}): {span}; {engines or 'no engines'}")
        for e in self.engines:
            senders = self.engine_ranks(e)
            via = (
                f"weights from ranks {list(senders)} (CUDA IPC)" if senders else "weights over NCCL"
            )
            lines.append(
                f"  engine {e.index}: {e.url} tp={e.tp} base_gpu_id={e.base_gpu_id}; {via}"
            )
        return "\n".join(lines)


def _span(gpus: tuple[int, ...]) -> str:
    return f"{gpus[0]}-{gpus[-1]}" if len(gpus) > 1 else str(gpus[0])


def _host(topology: Topology, node: int) -> str:
    return topology.hosts[node] if topology.hosts else "127.0.0.1"


def plan_layout(
    topology: Topology,
    *,
    mode: Mode,
    engine_tp: int,
    num_engines: int | None,
    base_port: int,
    host: str = "auto",
) -> Layout:
    """The layout for ``topology`` (pure; raises ConfigError naming the key that cannot fit).

    ``num_engines`` None fills every slot; ``host`` "auto" binds each server to its node's
    address, anything else is used as the bind address of every server.
    """
    t = topology
    if min(t.train_nodes, t.ranks_per_node, t.gpus_per_node) < 1 or t.rollout_nodes < 0:
        raise ConfigError(f"launch: impossible topology {t}")
    if t.ranks_per_node > t.gpus_per_node:
        raise ConfigError(
            f"launch.gpus_per_node={t.gpus_per_node}: {t.ranks_per_node} training ranks per node "
            "need a GPU each"
        )
    if t.hosts and len(t.hosts) != t.num_nodes:
        raise ConfigError(f"{HOSTS_ENV}: {len(t.hosts)} addresses for {t.num_nodes} nodes")
    if t.num_nodes > 1 and not t.hosts and host == "auto":
        raise ConfigError(
            f"placement over {t.num_nodes} nodes needs each node's address: set {HOSTS_ENV} "
            "(slurm/launch.sh does) or rollout.server.host"
        )
    if engine_tp < 1 or t.gpus_per_node % engine_tp:
        raise ConfigError(
            f"rollout.server.engine_tp={engine_tp} must divide launch.gpus_per_node="
            f"{t.gpus_per_node} (an engine does not span nodes)"
        )
    ranks = tuple(
        TrainRank(rank=n * t.ranks_per_node + lr, node=n, local_rank=lr, gpu=lr)
        for n in range(t.train_nodes)
        for lr in range(t.ranks_per_node)
    )
    if mode == "colocate":
        if t.rollout_nodes:
            raise ConfigError(
                f"launch.rollout_nodes={t.rollout_nodes}: colocated engines run on the training "
                "nodes; use rollout.placement=disaggregate for dedicated rollout nodes"
            )
        if t.ranks_per_node % engine_tp:
            raise ConfigError(
                f"rollout.server.engine_tp={engine_tp} must divide the {t.ranks_per_node} training "
                "ranks per node when colocated (engine GPUs are training GPUs)"
            )
        nodes, per_node = list(range(t.train_nodes)), t.ranks_per_node // engine_tp
        first_gpu = 0
    elif t.rollout_nodes:
        nodes, per_node = list(range(t.train_nodes, t.num_nodes)), t.gpus_per_node // engine_tp
        first_gpu = 0
    else:
        spare = t.gpus_per_node - t.ranks_per_node
        if spare < engine_tp:
            raise ConfigError(
                f"rollout.placement=disaggregate without launch.rollout_nodes needs spare GPUs on "
                f"the training nodes: {t.gpus_per_node} GPUs - {t.ranks_per_node} ranks = {spare} "
                f"< engine_tp={engine_tp}"
            )
        nodes, per_node = list(range(t.train_nodes)), spare // engine_tp
        first_gpu = t.ranks_per_node
    capacity = len(nodes) * per_node
    count = capacity if num_engines is None else num_engines
    if not 1 <= count <= capacity:
        raise ConfigError(
            f"rollout.server.num_engines={num_engines}: {mode} placement has room for {capacity} "
            f"engine(s) of tp={engine_tp} ({len(nodes)} node(s) x {per_node})"
        )
    engines = []
    for index in range(count):
        node, slot = nodes[index % len(nodes)], index // len(nodes)
        start = first_gpu + slot * engine_tp
        bind = _host(t, node) if host == "auto" else host
        engines.append(
            EngineSlot(
                index=index,
                node=node,
                gpus=tuple(range(start, start + engine_tp)),
                host=bind,
                port=base_port + PORT_STRIDE * index,
            )
        )
    return Layout(mode=mode, topology=t, ranks=ranks, engines=tuple(engines))


def engine_request(rollout: RolloutConfig) -> tuple[int, int | None]:
    """(engine_tp, num_engines) the run asks the placement for: SGLang as configured; the
    embedded engine is one in-process engine of rank 0 (tp 1); vLLM is one engine beside it."""
    server, engine = rollout.server, rollout.engine
    tp = server.engine_tp if engine != "embedded" else 1
    return tp, server.num_engines if engine == "sglang" else 1


def topology_from_env(
    launch: LaunchConfig,
    environ: dict[str, str] | None = None,
    *,
    cuda_devices: int | None = None,
) -> Topology:
    """The job as torchrun, srun or a plain start launched it, checked against ``launch.*``.

    torchrun: GROUP_WORLD_SIZE nodes of LOCAL_WORLD_SIZE ranks; srun without torchrun:
    SLURM_NNODES nodes of SLURM_NTASKS / SLURM_NNODES; otherwise one node with WORLD_SIZE
    ranks (our own spawner) or one process. ``cuda_devices`` (default: what torch sees)
    gives the GPUs per node; on CPU every rank is a "GPU" slot unless launch.gpus_per_node says
    more.
    """
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")) or 1)
    if "GROUP_WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        nodes, per_node = int(env["GROUP_WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
    elif "RANK" not in env and "SLURM_NNODES" in env and "SLURM_NTASKS" in env:
        nodes = int(env["SLURM_NNODES"]) - launch.rollout_nodes
        per_node = int(env["SLURM_NTASKS"]) // max(nodes, 1)
    else:
        nodes, per_node = 1, int(env.get("LOCAL_WORLD_SIZE", world))
    if nodes * per_node != world:
        raise ConfigError(
            f"launcher: {nodes} node(s) x {per_node} rank(s) != world size {world}; every node "
            "must run the same number of training ranks"
        )
    if launch.nodes is not None and launch.nodes != nodes:
        raise ConfigError(f"launch.nodes={launch.nodes} but the job was launched on {nodes}")
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = cuda_devices or launch.gpus_per_node or per_node
    if launch.gpus_per_node is not None and cuda_devices and launch.gpus_per_node != cuda_devices:
        raise ConfigError(
            f"launch.gpus_per_node={launch.gpus_per_node} but this node has {cuda_devices} GPUs"
        )
    total = nodes + launch.rollout_nodes
    return Topology(train_nodes=nodes, ranks_per_node=per_node, gpus_per_node=gpus,
                    rollout_nodes=launch.rollout_nodes, hosts=node_hosts(total, env))  # fmt: skip


def serve_layout(cfg: RunConfig, environ: dict[str, str] | None = None) -> Layout:
    """The layout as a rollout-only node sees it: no torchrun there, so ``launch.nodes`` and
    ``launch.gpus_per_node`` (or this node's GPUs) describe the training side."""
    launch, sg = cfg.launch, cfg.rollout.server
    if cfg.rollout.engine != "sglang" or cfg.rollout.placement != "disaggregate":
        raise ConfigError("megatron-mel serve is for rollout.engine=sglang, placement=disaggregate")
    if launch.nodes is None or launch.rollout_nodes < 1:
        raise ConfigError("megatron-mel serve needs launch.nodes and launch.rollout_nodes >= 1")
    gpus = launch.gpus_per_node
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        raise ConfigError("launch.gpus_per_node: unknown here (no CUDA); set it")
    total = launch.nodes + launch.rollout_nodes
    topology = Topology(train_nodes=launch.nodes, ranks_per_node=gpus, gpus_per_node=gpus,
                        rollout_nodes=launch.rollout_nodes, hosts=node_hosts(total, environ))  # fmt: skip
    return plan_layout(topology, mode="disaggregate", engine_tp=sg.engine_tp,
                       num_engines=sg.num_engines, base_port=sg.base_port, host=sg.host)  # fmt: skip


def node_hosts(num_nodes: int, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Every node's address from ``MEL_NODE_HOSTS`` (empty when unset)."""
    value = (os.environ if environ is None else environ).get(HOSTS_ENV, "").strip()
    if not value:
        return ()
    hosts = tuple(h.strip() for h in value.split(",") if h.strip())
    if len(hosts) != num_nodes:
        raise ConfigError(f"{HOSTS_ENV}={value!r}: {len(hosts)} addresses for {num_nodes} nodes")
    return hosts


def check_rank_table(layout: Layout, gathered: list[tuple[int, int, int]]) -> None:
    """``gathered[i]`` = (rank, node, local_rank) reported by rank i; they must match the
    layout's numbering, or engines would be fed by ranks on the wrong GPUs."""
    expected = {r.rank: (r.node, r.local_rank) for r in layout.ranks}
    for rank, node, local_rank in gathered:
        if expected.get(rank) != (node, local_rank):
            raise ConfigError(
                f"rank {rank} runs on node {node} as local rank {local_rank}, but the placement "
                f"expects {expected.get(rank)}: start one torchrun per node with the same "
                "--nproc-per-node"
            )
