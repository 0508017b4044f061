"""The run configuration's schema: one tree of typed sections, each field with its docstring.

Every section is a ``@dataclass(kw_only=True, slots=True)``; ``__post_init__`` checks raise
ConfigError naming the dotted key (the loader, ``config/loader.py``, adds ``file:line``).
``RunConfig.__post_init__`` holds the cross-section checks and resolves the defaults that refer
to another section (a ``None`` budget becomes ``rollout.max_new_tokens``), so no reader repeats
them. Checks that need the model's shape (heads divisible by TP, layers by PP, world size) live
in ``models/arch.py``: they read ``config.json``.

Defaults follow ../shared/spec/MEL.md (marked "paper" where the paper fixes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_mel.assets.cache import expand_path
from megatron_mel.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]

RENAMED_KEYS = {"rollout.sglang": "rollout.server"}
"""Keys a recipe may still use from an older release -> the key that replaced them; the loader
refuses the old one with a message naming the new one."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    hf_dir: str
    """Hugging Face model directory (config.json, safetensors, tokenizer). Required.
    ``asset:SmolLM2-135M-Instruct`` names the offline default model."""
    dtype: DType = "bfloat16"
    """Parameter and activation dtype of the trainer. CPU recipes use float32."""
    attention_backend: Literal["auto", "local", "te"] = "auto"
    """Core attention: "te" (Transformer Engine, GPU), "local" (torch varlen, CPU and GPU), or
    "auto" (te when CUDA and transformer-engine are present, else local)."""
    max_seq_len: int = 8192
    """Longest sequence the trainer accepts: a rollout (prompt + response) or a meta-experience
    sample (reflection prompt + M). Checked when the config loads (data.max_prompt_tokens +
    rollout.max_new_tokens must fit), by the reflection stage (a candidate M whose NLL sequence
    would be longer is dropped as "too_long" and counted), and by the trainer's packer (an error
    naming this key). It bounds activation memory; RoPE tables are computed per forward."""
    vocab_padding_multiple: int = 1024
    """Embedding rows are padded to a multiple of this. It must be a multiple of every TP size a
    checkpoint will be loaded at: 1024 = 128 x 8 keeps checkpoints portable across TP 1/2/4/8."""
    init_seed: int = 1234
    """Seed for Megatron's RNG trackers (dropout is off; weights come from hf_dir)."""
    recompute_activations: bool = False
    """Full activation recomputation of every transformer layer (saves memory, costs compute)."""

    def __post_init__(self) -> None:
        self.hf_dir = expand_path(self.hf_dir)
        _require(self.max_seq_len > 0, "model.max_seq_len", "must be positive")
        _require(
            self.vocab_padding_multiple > 0 and self.vocab_padding_multiple % 128 == 0,
            "model.vocab_padding_multiple",
            "must be a positive multiple of 128 (e.g. 1024)",
        )


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: must divide attention heads and KV heads."""
    pp: int = 1
    """Pipeline-parallel size: must divide the number of layers."""
    dp: int | None = None
    """Data-parallel size; None infers world_size / (tp * pp), otherwise it must match."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None disables."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (Transformer Engine or Apex norms: GPU); off at tp=1."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""
    timeout_minutes: int = 30
    """Collective timeout; a dead peer fails the step after this long instead of hanging."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1")
        _require(self.dp is None or self.dp >= 1, "parallel.dp", "must be >= 1 or null")
        _require(self.vpp is None or self.vpp >= 2, "parallel.vpp", "must be >= 2 or null")
        _require(
            self.vpp is None or self.pp > 1, "parallel.vpp", "needs parallel.pp > 1 to interleave"
        )
        # Nothing to split at tp=1: off, as Megatron-LM's own arguments do (so a recipe sized
        # for TP can be re-planned at tp=1 with one override).
        self.sequence_parallel = self.sequence_parallel and self.tp > 1
        _require(self.timeout_minutes > 0, "parallel.timeout_minutes", "must be positive")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train_path: str = ""
    """Prompt dataset (.jsonl or .parquet); ``asset:data/<split>.jsonl`` for the offline splits.
    Empty only for commands that do not train."""
    eval_paths: dict[str, str] = field(default_factory=dict)
    """Benchmark name -> dataset path, evaluated every trainer.eval_every steps."""
    id_key: str = "id"
    """Field holding a stable prompt id."""
    question_key: str = "question"
    """Field holding the problem statement."""
    answer_key: str = "answer"
    """Field holding the gold answer the verifier compares with."""
    prompt_template: str = (
        "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    )
    """Solver prompt; ``{question}`` is replaced (MEL paper-notes gap 21)."""
    apply_chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template as one user turn."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this (chat-formatted tokens) are dropped at load time, logged, and
    counted in the ``data/prompts_dropped_too_long`` metric."""
    shuffle: bool = True
    """Shuffle the prompt order every epoch (seeded by launch.seed)."""

    def __post_init__(self) -> None:
        self.train_path = expand_path(self.train_path)
        self.eval_paths = {name: expand_path(path) for name, path in self.eval_paths.items()}
        _require("{question}" in self.prompt_template, "data.prompt_template", "needs {question}")
        _require(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be positive")


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    num_engines: int | None = None
    """Rollout engine replicas (each spans engine_tp GPUs of one node); None fills every slot the
    placement has (rollout/placement.py)."""
    engine_tp: int = 1
    """Tensor-parallel size inside one engine; must divide the GPUs of a node."""
    mem_fraction_static: float = 0.5
    """GPU memory share SGLang may claim for weights + KV cache (colocated: leave room)."""
    host: str = "auto"
    """Address servers bind to: "auto" = loopback on a one-node job, else each node's address
    (MEL_NODE_HOSTS, set by slurm/launch.sh); anything else binds every server there."""
    base_port: int = 30000
    """Engine i listens on base_port + 10 i (HTTP) and base_port + 10 i + 1 (its NCCL group)."""
    urls: list[str] = field(default_factory=list)
    """Connect to already-running servers instead of launching them."""
    request_timeout_s: float = 600.0
    """A generation request that takes longer fails the phase (it can be retried)."""
    launch_timeout_s: float = 900.0
    """A launched server that is not healthy after this long stops the run (its log is shown)."""
    server_module: str = "sglang.launch_server"
    """Module run as ``python -m <module>`` for each server (tests use a fake speaking the same
    HTTP routes)."""
    extra_server_args: list[str] = field(default_factory=list)
    """More command-line flags for every launched server."""

    def __post_init__(self) -> None:
        _require(
            self.num_engines is None or self.num_engines >= 1,
            "rollout.server.num_engines",
            "must be >= 1 or null (fill the placement)",
        )
        _require(self.engine_tp >= 1, "rollout.server.engine_tp", "must be >= 1")
        _require(
            0 < self.mem_fraction_static < 1,
            "rollout.server.mem_fraction_static",
            "must be in (0, 1)",
        )
        _require(1024 <= self.base_port <= 65000, "rollout.server.base_port", "must be a port")
        _require(self.request_timeout_s > 0, "rollout.server.request_timeout_s", "must be > 0")
        _require(self.launch_timeout_s > 0, "rollout.server.launch_timeout_s", "must be > 0")


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    engine: Literal["embedded", "sglang", "vllm"] = "embedded"
    """Generation backend: in-process (CPU/GPU), SGLang, or vLLM."""
    placement: Literal["colocate", "disaggregate"] = "colocate"
    """colocate: engines share the training GPUs (memory released/resumed around training);
    disaggregate: engines on their own GPUs (dedicated rollout nodes, or a node's GPUs beyond
    its training ranks), weights sent over NCCL. See rollout/placement.py."""
    release_memory: bool = True
    """Colocated engines free their weights and KV cache during training and get them back
    before the next rollout (resume weights, sync, resume KV). Off keeps them resident."""
    prompts_per_step: int = 128
    """Prompts per training step (paper: 128)."""
    samples_per_prompt: int = 8
    """Group size G (paper: 8)."""
    temperature: float = 1.0
    """Rollout sampling temperature (paper: 1.0)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    max_new_tokens: int = 4096
    """Response budget; a response cut by it scores 0."""
    weight_bucket_mb: int = 512
    """Flattened-bucket size for weight sync."""
    verify_weights: bool = False
    """After each sync, compare engine weights with the trainer's HF export; stop on mismatch."""
    max_retries: int = 2
    """Times a generation phase is retried after an engine error (dead or timed-out server)
    before training stops; retries reuse the same prompts and seeds."""
    embedded_max_batch_size: int = 64
    """Sequences the embedded engine decodes at once (more are queued in batches)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The inference servers of rollout.engine sglang or vllm (vLLM reads engine_tp and
    mem_fraction_static from here too)."""

    def __post_init__(self) -> None:
        _require(
            self.embedded_max_batch_size >= 1, "rollout.embedded_max_batch_size", "must be >= 1"
        )
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
        _require(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
        _require(self.temperature >= 0, "rollout.temperature", "must be >= 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _require(self.weight_bucket_mb >= 1, "rollout.weight_bucket_mb", "must be >= 1")
        _require(self.max_retries >= 0, "rollout.max_retries", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class ReflectionConfig:
    max_pairs_per_prompt: int | None = None
    """Contrastive pairs per mixed group; None = all |Y+| x |Y-| (paper)."""
    temperature: float = 1.0
    """Sampling temperature of the meta-experience generation."""
    max_new_tokens: int = 2048
    """Meta-experience budget; outputs cut by it are dropped and counted."""
    replay_temperature: float = 1.0
    """Sampling temperature of the replay (validation) solve."""
    replay_max_new_tokens: int | None = None
    """Replay budget; None = rollout.max_new_tokens (resolved when the RunConfig is built)."""
    drop_truncated: bool = True
    """Drop meta-experiences cut by reflection.max_new_tokens (MEL.md step 5 DEFAULT)."""
    reject_answer_leaks: bool = False
    """Drop meta-experiences that contain the gold answer string (logged either way)."""
    require_heuristics: bool = False
    """Drop meta-experiences without a heuristics section (logged either way)."""
    experience_template: str | None = None
    """Path of a template file overriding the built-in meta-experience prompt."""
    replay_template: str | None = None
    """Path of a template file overriding the built-in replay prompt."""

    def __post_init__(self) -> None:
        _require(
            self.max_pairs_per_prompt is None or self.max_pairs_per_prompt >= 1,
            "reflection.max_pairs_per_prompt",
            "must be >= 1 or null (all pairs)",
        )
        _require(self.max_new_tokens >= 1, "reflection.max_new_tokens", "must be >= 1")
        _require(
            self.replay_max_new_tokens is None or self.replay_max_new_tokens >= 1,
            "reflection.replay_max_new_tokens",
            "must be >= 1 or null (rollout.max_new_tokens)",
        )


@dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    name: Literal["mel", "grpo", "reinforce_pp", "rft"] = "mel"
    """Base algorithm; "mel" is GRPO plus the meta-experience term (paper)."""
    meta_experience: bool | None = None
    """Add the reflection stage and NLL term; None = on for "mel", off otherwise."""
    advantage: Literal["grpo", "rloo", "reinforce_pp"] | None = None
    """Advantage estimator; None picks the one that goes with `name`."""
    std_normalize: bool = True
    """GRPO: divide by the group std (+1e-6); False is Dr.GRPO-style."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    """Clip range [1 - clip_low, 1 + clip_high]; clip_high > clip_low is clip-higher."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages; None disables."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    """Policy-gradient aggregation (paper Eq. 10: seq-mean-token-mean)."""
    nll_coef: float = 1.0
    """Weight of the meta-experience NLL term (paper: 1)."""
    nll_norm: Literal["per_me", "per_prompt"] = "per_me"
    """NLL normalisation: mean over kept meta-experiences, or per prompt then over prompts."""
    kl_coef: float = 0.0
    """KL-to-reference weight (paper: 0)."""
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (k3 = low_var_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus (paper: 0)."""
    recompute_old_logprobs: bool = True
    """pi_old from the trainer at the rollout weights. The trainer takes one optimizer update
    per batch, so pi_old is the policy at that update: its log-probs come from the training
    forward itself (rho = 1 exactly there) and no separate no-grad forward runs. False uses the
    engine's log-probs as pi_old (rho then carries the engine/trainer numeric mismatch). Either
    way rollout/train_logprob_*_diff compares the engine's log-probs with the training forward's."""

    def __post_init__(self) -> None:
        _require(0 <= self.clip_low < 1, "algorithm.clip_low", "must be in [0, 1)")
        _require(self.clip_high >= 0, "algorithm.clip_high", "must be >= 0")
        _require(self.dual_clip is None or self.dual_clip > 1, "algorithm.dual_clip", "must be > 1")
        _require(self.nll_coef >= 0, "algorithm.nll_coef", "must be >= 0")
        _require(self.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")

    @property
    def uses_meta_experience(self) -> bool:
        return self.name == "mel" if self.meta_experience is None else self.meta_experience

    @property
    def estimator(self) -> str:
        """The advantage estimator: ``advantage``, or the one that goes with ``name``."""
        return self.advantage or ("reinforce_pp" if self.name == "reinforce_pp" else "grpo")


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    function: str = "megatron_mel.rewards.verifier:math_reward"
    """Reward hook ``module:function`` (response, answer) -> float (megatron_mel/hooks.py)."""
    timeout_s: float = 5.0
    """Hard limit per check; a check that runs longer scores 0 and is counted."""
    num_workers: int = 2
    """Verifier worker processes."""
    score_truncated: bool = False
    """Score responses cut by the length limit like any other; False gives them 0 (MEL.md step
    2 DEFAULT: a truncated response has no final answer to trust)."""
    max_consecutive_failures: int = 50
    """The reward function raising (or returning a non-finite number, or crashing its worker)
    this many times in a row stops training with an error naming it and its first exception;
    one-off failures score 0 and are counted. 0 never stops."""

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "reward.timeout_s", "must be positive")
        _require(self.num_workers >= 1, "reward.num_workers", "must be >= 1")
        _require(
            self.max_consecutive_failures >= 0,
            "reward.max_consecutive_failures",
            "must be >= 0 (0 never stops)",
        )


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-6
    """Learning rate (paper: 1e-6)."""
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    micro_batch_tokens: int = 8192
    """Token budget of one packed (THD) micro-batch on one data-parallel rank."""
    share_prefixes: bool = True
    """Pack the samples of one prompt as the prompt once plus one continuation per response
    (each sees exactly its own context), so a group of G pays for its prompt once in the
    trainer's forward and backward. Needs the local attention (model.attention_backend local,
    the CPU default); ignored with Transformer Engine's."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be positive")
        _require(self.micro_batch_tokens > 0, "optim.micro_batch_tokens", "must be positive")
        _require(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    dir: str = ""
    """Checkpoint directory; empty = <launch.run_dir>/checkpoints."""
    save_every: int = 10
    """Save every N steps (and at the end, and before the walltime limit)."""
    keep_last: int = 2
    """Older checkpoints are deleted once a newer one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest complete checkpoint in `dir` if there is one."""
    walltime_minutes: float | None = None
    """Job walltime, counted from the trainer's start; a checkpoint is written before it runs
    out."""
    job_end_time: float | None = None
    """Unix time at which the scheduler ends the job (slurm/launch.sh reads it from squeue); a
    checkpoint is written before it. Unlike walltime_minutes, model loading does not eat into
    the margin."""

    def __post_init__(self) -> None:
        _require(self.save_every >= 1, "checkpoint.save_every", "must be >= 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    backend: Literal["mlflow", "console"] = "mlflow"
    """mlflow also prints to the console."""
    experiment: str = "megatron-mel"
    """MLflow experiment (MLFLOW_EXPERIMENT_NAME wins when set)."""
    run_name: str = ""
    """MLflow run name; empty = derived from the recipe and time."""
    tracking_uri: str = ""
    """MLflow store; empty = MLFLOW_TRACKING_URI, else sqlite under launch.run_dir."""


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    num_steps: int = 136
    """Training steps (paper: ~1 epoch of DAPO-Math-17k at 128 prompts per step)."""
    eval_every: int = 10
    """Evaluate every N steps (and after the last); 0 disables."""
    eval_k: int = 8
    """Samples per problem for Avg@k / Pass@k (paper: 8)."""
    eval_temperature: float = 0.6
    """Sampling temperature of Avg@k / Pass@k (paper: 0.6); Pass@1 is greedy."""
    eval_max_new_tokens: int | None = None
    """Evaluation response budget; None = rollout.max_new_tokens (resolved when the RunConfig
    is built)."""
    eval_limit: int | None = None
    """Evaluate only the first N problems of each benchmark (quick CPU runs); None = all."""

    def __post_init__(self) -> None:
        _require(self.num_steps >= 1, "trainer.num_steps", "must be >= 1")
        _require(self.eval_every >= 0, "trainer.eval_every", "must be >= 0")
        _require(self.eval_k >= 1, "trainer.eval_k", "must be >= 1")
        _require(
            self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1,
            "trainer.eval_max_new_tokens",
            "must be >= 1 or null (rollout.max_new_tokens)",
        )


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    run_dir: str = "runs/default"
    """Where checkpoints, meta-experience store, MLflow store and logs go."""
    seed: int = 42
    """Seed of data order and sampling."""
    nodes: int | None = None
    """Training nodes. None = what the launcher started (torchrun / srun); a value is what
    `megatron-mel plan` sizes and what a run checks its launcher against."""
    gpus_per_node: int | None = None
    """GPUs of a node. None = what CUDA sees (on CPU: the ranks per node)."""
    rollout_nodes: int = 0
    """Nodes after the training nodes that only run rollout engines (rollout.placement =
    disaggregate); their servers are started by `megatron-mel serve` (slurm/launch.sh)."""

    def __post_init__(self) -> None:
        _require(self.nodes is None or self.nodes >= 1, "launch.nodes", "must be >= 1 or null")
        _require(
            self.gpus_per_node is None or self.gpus_per_node >= 1,
            "launch.gpus_per_node",
            "must be >= 1 or null",
        )
        _require(self.rollout_nodes >= 0, "launch.rollout_nodes", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        # Budgets that default to the rollout's, resolved here once for every reader.
        if self.reflection.replay_max_new_tokens is None:
            self.reflection.replay_max_new_tokens = self.rollout.max_new_tokens
        if self.trainer.eval_max_new_tokens is None:
            self.trainer.eval_max_new_tokens = self.rollout.max_new_tokens
        algo, group = self.algorithm, self.rollout.samples_per_prompt
        estimator = algo.estimator
        relative = algo.name != "rft" and estimator in ("grpo", "rloo")
        _require(
            group >= 2 or not (relative or algo.uses_meta_experience),
            "rollout.samples_per_prompt",
            f"is 1, but {algo.name} "
            + (f"compares each response with its group ({estimator} advantages are all 0 "
               "with one response, so nothing is learned)" if relative else
               "needs mixed groups (a correct and a wrong response) for meta-experiences")
            + "; use >= 2, or algorithm.name=rft / reinforce_pp",
        )  # fmt: skip
        longest = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        _require(
            longest <= self.model.max_seq_len,
            "model.max_seq_len",
            f"{self.model.max_seq_len} is shorter than the longest rollout sequence, "
            f"data.max_prompt_tokens + rollout.max_new_tokens = {longest}; raise it or lower those",
        )


def _require(ok: bool, key: str, expectation: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {expectation}")
