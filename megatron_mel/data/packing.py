"""Training samples and the THD packer that turns them into loss-annotated micro-batches.

A :class:`TrainSample` is one sequence the trainer learns from: a rollout response (policy
gradient), a correct response under RFT, or a meta-experience after its reflection prompt (NLL).
Its ``tokens`` are context followed by targets; only targets carry a loss.

The packer concatenates samples into THD micro-batches of at most ``max_tokens`` tokens and
shifts labels inside each sequence: the hidden state at position i predicts token i + 1 of the
same sequence, so for a sample with context length p and n tokens, positions p-1 .. n-2 carry
the loss of targets p .. n-1, and the last position of every sequence carries none. Nothing ever
predicts across a sequence boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_mel.algorithms.token_loss import IGNORE, NLL, PG
from megatron_mel.models.forward import MicroBatch


@dataclass(slots=True)
class TrainSample:
    TERMS: ClassVar[frozenset[str]] = frozenset({"pg", "rft", "me"})
    LOSS_TYPES: ClassVar[dict[str, int]] = {"pg": PG, "rft": NLL, "me": NLL}

    tokens: list[int]
    """Context tokens followed by target tokens."""
    num_context: int
    """Tokens before the first target (the prompt; >= 1)."""
    term: str
    """Loss term: "pg" (policy gradient), "rft" (NLL on a correct response), "me" (meta-exp.)."""
    advantage: float = 0.0
    """Outcome advantage, broadcast to every target token (PG only)."""
    old_logprobs: list[float] | None = None
    """Behaviour log-probs pi_old of the target tokens (PG only). None = on-policy: pi_old is
    the policy being trained, taken from the training forward itself (rho = 1 at the update;
    algorithms/token_loss.py). A pack's PG samples are all on-policy or all carry values."""
    ref_logprobs: list[float] | None = None
    """Reference-policy log-probs of the target tokens (only when a KL term is used)."""
    group_size: int = 1
    """Samples of the same term sharing this prompt (per_prompt NLL normalisation)."""
    token_weight: float = 0.0
    """Set by algorithms.aggregation before packing."""
    prompt_id: str = ""
    train_logprobs: list[float] | None = None
    """Set by Actor.forward_backward: log pi_theta of the target tokens in the training forward,
    at the weights before the update (pi_old of an on-policy sample; rollout/train mismatch)."""

    def __post_init__(self) -> None:
        if self.term not in self.TERMS:
            raise ValueError(f"term must be one of {sorted(self.TERMS)}, got {self.term!r}")
        if not 1 <= self.num_context <= len(self.tokens):
            raise ValueError(
                f"num_context must be in [1, {len(self.tokens)}], got {self.num_context}"
            )
        for name in ("old_logprobs", "ref_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != self.num_targets:
                raise ValueError(f"{name} has {len(values)} entries for {self.num_targets} targets")

    @property
    def num_targets(self) -> int:
        return len(self.tokens) - self.num_context

    @property
    def loss_type(self) -> int:
        return self.LOSS_TYPES[self.term]


@dataclass(slots=True)
class TrainMicroBatch:
    """One packed micro-batch: model inputs plus per-token loss fields (all [t])."""

    inputs: MicroBatch
    labels: torch.Tensor
    loss_type: torch.Tensor
    token_weight: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    """None when the pack's PG samples are on-policy (TrainSample.old_logprobs)."""
    ref_logprobs: torch.Tensor | None = None
    sample_ids: list[int] = field(default_factory=list)
    """Index into the packed sample list of each sequence, in pack order."""
    index: int = 0
    """Position of this micro-batch in its step (for error messages)."""

    @property
    def num_tokens(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TrainMicroBatch:
        return TrainMicroBatch(
            self.inputs.to(device),
            self.labels.to(device),
            self.loss_type.to(device),
            self.token_weight.to(device),
            self.advantages.to(device),
            None if self.old_logprobs is None else self.old_logprobs.to(device),
            None if self.ref_logprobs is None else self.ref_logprobs.to(device),
            list(self.sample_ids),
            self.index,
        )


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices into packs of at most ``max_tokens`` tokens, in order.

    A sample longer than ``max_tokens`` gets a pack of its own (it cannot be split: attention
    needs the whole sequence).
    """
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        packs.append(current)
    return packs


def pack_samples(
    samples: Sequence[TrainSample], indices: Sequence[int], *, pad_to_multiple: int = 1
) -> TrainMicroBatch:
    """Pack ``samples[indices]`` into one THD micro-batch (see the module docstring).

    ``pad_to_multiple`` appends an ignored padding sequence so the pack length divides it
    (sequence parallelism needs the token count divisible by TP).
    """
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    loss_type: list[int] = []
    weight: list[float] = []
    adv: list[float] = []
    old: list[float] = []
    ref: list[float] = []
    with_ref = any(samples[i].ref_logprobs is not None for i in indices)
    pg_old = {samples[i].old_logprobs is None for i in indices if samples[i].loss_type == PG}
    if len(pg_old) > 1:
        raise ValueError(
            "a pack mixes on-policy PG samples (old_logprobs None) with off-policy ones"
        )
    with_old = pg_old == {False}
    bounds = [0]
    for index in indices:
        sample = samples[index]
        n, p = len(sample.tokens), sample.num_context
        ids.extend(sample.tokens)
        positions.extend(range(n))
        # Position i predicts token i + 1; targets are tokens p .. n-1.
        labels.extend([*sample.tokens[1:], 0])
        kind = [IGNORE] * (p - 1) + [sample.loss_type] * (n - p) + [IGNORE]
        loss_type.extend(kind)
        weight.extend([0.0] * (p - 1) + [sample.token_weight] * (n - p) + [0.0])
        adv.extend([0.0] * (p - 1) + [sample.advantage] * (n - p) + [0.0])
        if with_old:
            targets_old = sample.old_logprobs or [0.0] * (n - p)
            old.extend([0.0] * (p - 1) + list(targets_old) + [0.0])
        if with_ref:
            if sample.ref_logprobs is None and sample.loss_type == PG:
                raise ValueError(f"sample {index} lacks ref_logprobs while others carry them")
            targets_ref = sample.ref_logprobs or [0.0] * (n - p)
            ref.extend([0.0] * (p - 1) + list(targets_ref) + [0.0])
        bounds.append(bounds[-1] + n)
    pad = (-bounds[-1]) % pad_to_multiple
    if pad:
        ids.extend([0] * pad)
        positions.extend(range(pad))
        labels.extend([0] * pad)
        loss_type.extend([IGNORE] * pad)
        weight.extend([0.0] * pad)
        adv.extend([0.0] * pad)
        if with_old:
            old.extend([0.0] * pad)
        if with_ref:
            ref.extend([0.0] * pad)
        bounds.append(bounds[-1] + pad)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if len(bounds) > 1 else 0
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    inputs = MicroBatch(
        torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        params,
    )
    return TrainMicroBatch(
        inputs=inputs,
        labels=torch.tensor(labels, dtype=torch.long),
        loss_type=torch.tensor(loss_type, dtype=torch.int8),
        token_weight=torch.tensor(weight, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        old_logprobs=torch.tensor(old, dtype=torch.float32) if with_old else None,
        ref_logprobs=torch.tensor(ref, dtype=torch.float32) if with_ref else None,
        sample_ids=list(indices),
    )


def pack_micro_batches(
    samples: Sequence[TrainSample], max_tokens: int, *, pad_to_multiple: int = 1
) -> list[TrainMicroBatch]:
    """All of ``samples`` as THD micro-batches of at most ``max_tokens`` tokens each."""
    plan = plan_micro_batches([len(s.tokens) for s in samples], max_tokens)
    return [pack_samples(samples, group, pad_to_multiple=pad_to_multiple) for group in plan]


def shard_for_data_parallel(
    samples: Sequence[TrainSample], dp_rank: int, dp_size: int
) -> list[TrainSample]:
    """This rank's share: samples dealt longest-first to the rank with the fewest tokens.

    Deterministic, so every rank computes the same assignment without communication.
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].tokens), i))
    loads = [0] * dp_size
    owner = [0] * len(samples)
    for index in order:
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        owner[index] = rank
        loads[rank] += len(samples[index].tokens)
    return [s for i, s in enumerate(samples) if owner[i] == dp_rank]
