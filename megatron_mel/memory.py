"""Per-GPU memory estimate of a run: what `megatron-mel plan` prints before a job waits in a queue.

The numbers follow what this project allocates, not a generic model:

* weights: the model dtype (bf16 on GPU); grads: an fp32 buffer per parameter (the actor's
  Megatron DDP uses ``grad_reduce_in_fp32``); Adam: fp32 exp_avg and exp_avg_sq, plus an fp32
  master copy when the weights are not fp32, divided by DP with the distributed optimizer
  (the grad buffer is not: Megatron's distributed optimizer shards states, not gradients).
* parameters per GPU: per TP rank of the heaviest pipeline stage. Linear layers and the
  vocabulary-parallel embedding / output layer are split by TP; norms are replicated. With tied
  embeddings and PP > 1 the last stage holds its own copy of the embedding (Megatron's shared
  output weight).
* activations: one packed micro-batch is ``optim.micro_batch_tokens`` tokens. Per token and
  layer, a Llama/Qwen block (flash-style attention, SwiGLU, no dropout) keeps the inputs of its
  two norms and of the QKV and fc1 GEMMs (4 h values; split by TP only with sequence
  parallelism), q, k, v and the attention output (2 q_dim + 2 kv_dim) and the fc1 output and
  fc2 input (3 ffn), the latter split by TP. Full recomputation keeps only each layer's input
  and re-creates one layer at a time in backward. 1F1B keeps ``pp - s`` micro-batches in flight
  on stage ``s`` (so stage 0 holds ``num_layers`` layers' worth); an interleaved schedule adds
  Megatron's ``1 + (pp - 1) / (pp * vpp)``. Softmax statistics (< 0.1%) are left out.
* loss: the fused output layer (ops/fused_loss.py) never holds the full logits; the last stage
  keeps fp32 d_weight (vocab shard x h) and d_hidden (tokens x h) and a few logit chunks.
* engines: an SGLang server claims ``mem_fraction_static`` of the GPU for its weights (dtype,
  split by engine TP) and KV cache; a colocated engine with ``rollout.release_memory`` frees both
  during training and keeps only its CUDA context. The trainer keeps weights, grads and optimizer
  states resident through the rollout, so a colocated GPU peaks at the larger of
  rollout (trainer states + engine pool) and training (trainer states + activations + loss +
  engine context).
* reserve: each process on a GPU costs a CUDA context plus NCCL and allocator slack
  (:data:`PROCESS_RESERVE_GIB` for a trainer, :data:`ENGINE_CONTEXT_GIB` for an engine rank).

Anchor: Megatron-LM's ``theoretical_memory_usage.py`` (18 or 6 + 12/DP bytes per parameter;
its activation count, which assumes GeLU and dropout, is replaced by the SwiGLU count above).
All sizes are bytes; GiB = 2**30.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_mel.config import RunConfig
from megatron_mel.models.arch import ModelArch

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROCESS_RESERVE_GIB = 2.0
"""A training rank's CUDA context, NCCL buffers and caching-allocator slack."""
ENGINE_CONTEXT_GIB = 1.0
"""An engine rank's CUDA context (what a released colocated engine still holds)."""
LOSS_CHUNK_BYTES = 128 * 2**20
"""ops.fused_loss.DEFAULT_CHUNK_BYTES, not imported here (torch costs seconds of start-up on a
login node); tests/unit/test_memory.py keeps the two equal."""
LOSS_CHUNK_COPIES = 3
"""Chunk-sized fp32 temporaries alive at once in the fused loss (logits, probabilities, grad)."""


@dataclass(frozen=True, slots=True)
class StageParams:
    """Parameters one TP rank of pipeline stage ``stage`` holds."""

    stage: int
    layers: int
    count: int


def layer_params_per_rank(arch: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q_dim, kv_dim = arch.num_heads * d, arch.num_kv_heads * d
    sharded = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * f
    if arch.qkv_bias:
        sharded += q_dim + 2 * kv_dim
    replicated = 2 * h + (2 * d if arch.qk_norm else 0)
    return sharded // tp + replicated


def stage_params(arch: ModelArch, *, tp: int, pp: int, padded_vocab: int) -> list[StageParams]:
    """Parameters per TP rank of every pipeline stage (first: embedding; last: norm + output)."""
    layers = arch.num_layers // pp
    embedding = padded_vocab * arch.hidden_size // tp
    stages = []
    for s in range(pp):
        count = layers * layer_params_per_rank(arch, tp)
        if s == 0:
            count += embedding
        if s == pp - 1:
            count += arch.hidden_size  # final norm
            if not arch.tie_embeddings or pp > 1:
                count += embedding  # the output layer (a copy of the tied embedding when pp > 1)
        stages.append(StageParams(stage=s, layers=layers, count=count))
    return stages


def activation_bytes_per_token_layer(
    arch: ModelArch, *, tp: int, sequence_parallel: bool, dtype_bytes: int
) -> int:
    """Bytes one token keeps for one layer's backward (no recomputation)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q_dim, kv_dim = arch.num_heads * d, arch.num_kv_heads * d
    replicated = 4 * h  # inputs of both norms, of the QKV GEMM and of fc1
    sharded = 2 * q_dim + 2 * kv_dim + 3 * f
    return dtype_bytes * (replicated // (tp if sequence_parallel else 1) + sharded // tp)


@dataclass(slots=True)
class TrainingMemory:
    """One training GPU of pipeline stage ``stage``, in bytes."""

    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    optimizer_without_distributed: int
    activations: int
    loss: int
    reserve: int

    @property
    def resident(self) -> int:
        """What stays allocated between steps (through the rollout)."""
        return self.weights + self.grads + self.optimizer + self.reserve

    @property
    def training_peak(self) -> int:
        return self.resident + self.activations + self.loss


@dataclass(slots=True)
class EngineMemory:
    """One GPU of an engine of ``tp`` GPUs, in bytes (pool = weights + KV cache)."""

    tp: int
    weights: int
    pool: int | None
    kv_cache: int | None
    kv_bytes_per_token: int
    kv_tokens: int | None
    context: int


@dataclass(slots=True)
class GpuEstimate:
    """The peak of one kind of GPU: ``role`` is train, train+engine or engine."""

    role: str
    peak: int
    phase: str
    """Which phase sets the peak: rollout or training."""
    training: TrainingMemory | None = None
    engine: EngineMemory | None = None


@dataclass(slots=True)
class MemoryEstimate:
    gpus: list[GpuEstimate] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Why the run cannot fit (empty when it fits or no GPU size was given)."""

    @property
    def peak(self) -> int:
        return max(g.peak for g in self.gpus)

    def to_dict(self) -> dict:
        return {"peak_gib": self.peak / GIB, "problems": list(self.problems),
                "gpus": [asdict(g) for g in self.gpus]}  # fmt: skip


def training_memory(cfg: RunConfig, arch: ModelArch, *, dp: int) -> list[TrainingMemory]:
    """Every pipeline stage's training GPU (one TP rank of it)."""
    par, model = cfg.parallel, cfg.model
    tp, pp, tokens = par.tp, par.pp, cfg.optim.micro_batch_tokens
    e = DTYPE_BYTES[model.dtype]
    padded = arch.padded_vocab_size(model.vocab_padding_multiple)
    per_token_layer = activation_bytes_per_token_layer(
        arch, tp=tp, sequence_parallel=par.sequence_parallel, dtype_bytes=e
    )
    layer_input = e * arch.hidden_size // (tp if par.sequence_parallel else 1)
    interleave = 1 + (pp - 1) / (pp * par.vpp) if par.vpp else 1.0
    optim_per_param = 8 + (4 if model.dtype != "float32" else 0)
    out = []
    for sp in stage_params(arch, tp=tp, pp=pp, padded_vocab=padded):
        in_flight_layers = (pp - sp.stage) * sp.layers * interleave
        if model.recompute_activations:
            act = in_flight_layers * tokens * layer_input + tokens * per_token_layer
        else:
            act = in_flight_layers * tokens * per_token_layer
        loss = 0
        if sp.stage == pp - 1:
            loss = 4 * (padded // tp) * arch.hidden_size + 4 * tokens * arch.hidden_size
            loss += LOSS_CHUNK_COPIES * LOSS_CHUNK_BYTES
        optimizer_full = sp.count * optim_per_param
        out.append(
            TrainingMemory(
                stage=sp.stage,
                params=sp.count,
                weights=sp.count * e,
                grads=sp.count * 4,
                optimizer=optimizer_full // dp if par.use_distributed_optimizer else optimizer_full,
                optimizer_without_distributed=optimizer_full,
                activations=int(act),
                loss=loss,
                reserve=int(PROCESS_RESERVE_GIB * GIB),
            )
        )
    return out


def total_params(arch: ModelArch, padded_vocab: int) -> int:
    """Parameters of the whole model (what one engine holds over its TP ranks)."""
    layers = arch.num_layers * layer_params_per_rank(arch, 1)
    embeddings = padded_vocab * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    return layers + embeddings + arch.hidden_size


def engine_memory(cfg: RunConfig, arch: ModelArch, tp: int, gpu_bytes: int | None) -> EngineMemory:
    """One GPU of an engine; the pool and KV cache need the GPU's size."""
    e = DTYPE_BYTES[cfg.model.dtype]
    weights = total_params(arch, arch.padded_vocab_size(cfg.model.vocab_padding_multiple)) * e // tp
    kv_per_token = 2 * arch.num_layers * (arch.num_kv_heads * arch.head_dim // tp) * e
    pool = kv = tokens = None
    if gpu_bytes is not None:
        pool = int(cfg.rollout.server.mem_fraction_static * gpu_bytes)
        kv = pool - weights
        tokens = max(kv, 0) // kv_per_token
    return EngineMemory(tp=tp, weights=weights, pool=pool, kv_cache=kv,
                        kv_bytes_per_token=kv_per_token, kv_tokens=tokens,
                        context=int(ENGINE_CONTEXT_GIB * GIB))  # fmt: skip


def estimate(
    cfg: RunConfig,
    arch: ModelArch,
    *,
    dp: int,
    engine_tp: int | None,
    colocated_engines: bool,
    separate_engines: bool,
    gpu_mem_gib: float | None,
) -> MemoryEstimate:
    """The peak of each kind of GPU the layout uses, and what does not fit in ``gpu_mem_gib``.

    ``engine_tp`` None: no server engine (the embedded engine runs inside rank 0 and shares its
    weights' shape; it is not estimated). ``colocated_engines``: some training GPUs also hold an
    engine rank; ``separate_engines``: engines on GPUs of their own.
    """
    gpu_bytes = int(gpu_mem_gib * GIB) if gpu_mem_gib is not None else None
    result = MemoryEstimate()
    train = max(training_memory(cfg, arch, dp=dp), key=lambda m: m.training_peak)
    engine = engine_memory(cfg, arch, engine_tp, gpu_bytes) if engine_tp else None
    if engine is not None and colocated_engines:
        release = cfg.rollout.release_memory
        during_training = engine.context if release else engine.context + (engine.pool or 0)
        rollout = train.resident + engine.context + (engine.pool or engine.weights)
        training = train.training_peak + during_training
        phase = "rollout" if rollout >= training else "training"
        result.gpus.append(
            GpuEstimate("train+engine", max(rollout, training), phase, train, engine)
        )
    else:
        result.gpus.append(GpuEstimate("train", train.training_peak, "training", train))
    if engine is not None and separate_engines:
        peak = engine.context + (engine.pool or engine.weights)
        result.gpus.append(GpuEstimate("engine", peak, "rollout", engine=engine))
    if gpu_bytes is not None:
        result.problems = _problems(cfg, result, gpu_bytes)
    return result


def _problems(cfg: RunConfig, result: MemoryEstimate, gpu_bytes: int) -> list[str]:
    problems = []
    longest = cfg.model.max_seq_len
    for gpu in result.gpus:
        if gpu.peak > gpu_bytes:
            t = gpu.training
            detail = (
                f" (trainer: weights {_gib(t.weights)}, grads {_gib(t.grads)}, optimizer "
                f"{_gib(t.optimizer)}, activations {_gib(t.activations)})"
                if t is not None
                else ""
            )
            problems.append(
                f"{gpu.role} GPU needs {_gib(gpu.peak)} at its {gpu.phase} peak but has "
                f"{_gib(gpu_bytes)}{detail}; {_remedies(cfg, gpu)}"
            )
        e = gpu.engine
        if e is not None and e.kv_cache is not None and e.kv_tokens is not None:
            if e.kv_cache <= 0:
                problems.append(
                    f"rollout.server.mem_fraction_static={cfg.rollout.server.mem_fraction_static}:"
                    f" the engine pool {_gib(e.pool)} per GPU does not hold its weights "
                    f"{_gib(e.weights)} (engine_tp={e.tp}); raise it or rollout.server.engine_tp"
                )
            elif e.kv_tokens < longest:
                problems.append(
                    f"engine KV cache holds {e.kv_tokens} tokens per engine, fewer than one "
                    f"model.max_seq_len={longest} sequence; raise "
                    "rollout.server.mem_fraction_static or rollout.server.engine_tp"
                )
    return problems


def _remedies(cfg: RunConfig, gpu: GpuEstimate) -> str:
    fixes = ["raise parallel.tp or parallel.pp"] if gpu.training is not None else []
    if gpu.training is not None and not cfg.parallel.use_distributed_optimizer:
        fixes.append("turn on parallel.use_distributed_optimizer")
    if gpu.training is not None and not cfg.model.recompute_activations:
        fixes.append("turn on model.recompute_activations")
    if gpu.training is not None:
        fixes.append("lower optim.micro_batch_tokens")
    if gpu.engine is not None:
        fixes.append("lower rollout.server.mem_fraction_static")
    return "to fit: " + ", or ".join(fixes)


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def format_table(est: MemoryEstimate, gpu_mem_gib: float | None) -> str:
    """The estimate as text: one block per kind of GPU, then the verdict."""
    lines = []
    for gpu in est.gpus:
        lines.append(f"memory per GPU ({gpu.role}), peak {_gib(gpu.peak)} during {gpu.phase}:")
        t = gpu.training
        if t is not None:
            lines += [
                f"  trainer, pipeline stage {t.stage}: {t.params / 1e9:.3f} B parameters",
                f"    weights        {_gib(t.weights):>12}",
                f"    grads (fp32)   {_gib(t.grads):>12}",
                f"    optimizer      {_gib(t.optimizer):>12}   "
                f"(without the distributed optimizer {_gib(t.optimizer_without_distributed)})",
                f"    activations    {_gib(t.activations):>12}",
                f"    loss buffers   {_gib(t.loss):>12}",
                f"    reserve        {_gib(t.reserve):>12}",
            ]
        e = gpu.engine
        if e is not None:
            tokens = f"   ({e.kv_tokens} tokens)" if e.kv_tokens is not None else ""
            lines += [
                f"  engine rank (tp={e.tp}):",
                f"    weights        {_gib(e.weights):>12}",
                f"    pool           {_gib(e.pool):>12}   (mem_fraction_static of the GPU)",
                f"    KV cache       {_gib(e.kv_cache):>12}{tokens}",
                f"    context        {_gib(e.context):>12}",
            ]
    if gpu_mem_gib is None:
        lines.append("fit: not checked (give --gpu-mem-gib)")
    elif est.problems:
        lines += [f"does not fit: {p}" for p in est.problems]
    else:
        lines.append(f"fits: peak {_gib(est.peak)} of {gpu_mem_gib:g} GiB per GPU")
    return "\n".join(lines)
