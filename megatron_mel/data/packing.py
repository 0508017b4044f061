"""Training samples and the THD packer that turns them into loss-annotated micro-batches.

A :class:`TrainSample` is one sequence the trainer learns from: a rollout response (policy
gradient), a correct response under RFT, or a meta-experience after its reflection prompt (NLL).
Its ``tokens`` are context followed by targets; only targets carry a loss.

The packer concatenates samples into THD micro-batches of at most ``max_tokens`` tokens and
shifts labels inside each sequence: the hidden state at position i predicts token i + 1 of the
same sequence, so for a sample with context length p and n tokens, positions p-1 .. n-2 carry
the loss of targets p .. n-1, and the last position of every sequence carries none. Nothing ever
predicts across a sequence boundary.

Shared prefixes (``share_prefixes``). The G responses of a prompt have the same context, and
meta-experiences share their long instruction template; packed one by one, those tokens run
through the model once per sample. With sharing, samples whose contexts start alike form a
unit (:func:`prefix_units`): the common prefix once, then per sample a continuation segment
with the rest of its tokens that attends to the shared part first (models/attention.py,
PackedSegments) at RoPE positions continuing it. Each target sees exactly the context it would
see alone; a group of G with a prompt of p tokens costs p - 1 + sum(n_i - p + 1) tokens instead
of sum(n_i). Units are never split across micro-batches or data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from megatron_mel.algorithms.token_loss import IGNORE, NLL, PG
from megatron_mel.models.attention import PackedSegments
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
    """Index into the packed sample list of each packed sample, in pack order."""
    sample_spans: list[tuple[int, int]] = field(default_factory=list)
    """Token range [start, end) of the segment holding each packed sample's targets."""
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
            list(self.sample_spans),
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


@dataclass(slots=True)
class PackUnit:
    """Samples packed together: the first ``shared`` tokens of their (common) context once,
    then each sample's remaining tokens as a continuation; ``shared == 0``: one sample alone."""

    indices: list[int]
    shared: int = 0


# A shared prefix costs one more segment (an attention call); below this it is not worth it.
MIN_SHARED_PREFIX = 4


def prefix_units(
    samples: Sequence[TrainSample], share: bool, max_tokens: int | None = None
) -> list[PackUnit]:
    """``samples`` grouped into packing units, in order of first appearance.

    Without ``share`` every sample is its own unit. With it, a sample joins the unit whose
    shared prefix has the longest common prefix with its context if that saves tokens (the G
    responses of a prompt share all of it; meta-experiences share their instruction template),
    and the unit stays within ``max_tokens``. The shared part stops one token short of every
    member's context: the last context token starts each continuation, so its hidden state
    predicts the first target and labels never cross a segment boundary.
    """
    units: list[PackUnit] = []
    heads: list[list[int]] = []  # each unit's candidate prefix (the first member's context)
    for i, sample in enumerate(samples):
        best, best_gain = None, 0
        if share:
            context = sample.tokens[: sample.num_context - 1]
            for u, unit in enumerate(units):
                head = heads[u]
                limit = min(len(head), len(context))
                common = next((k for k in range(limit) if head[k] != context[k]), limit)
                if common < MIN_SHARED_PREFIX:
                    continue
                members = len(unit.indices)
                shared = unit.shared if members > 1 else len(head)
                new_shared = min(shared, common)
                # Tokens saved by the unit with this sample, minus those it saves now.
                gain = new_shared * members - shared * (members - 1)
                total = sum(len(samples[j].tokens) for j in unit.indices) + len(sample.tokens)
                grown = total - new_shared * members
                if gain > best_gain and (max_tokens is None or grown <= max_tokens):
                    best, best_gain = u, gain
        if best is None:
            units.append(PackUnit([i]))
            heads.append(sample.tokens[: sample.num_context - 1])
            continue
        unit = units[best]
        head = heads[best]
        shared = unit.shared if len(unit.indices) > 1 else len(head)
        context = sample.tokens[: sample.num_context - 1]
        limit = min(shared, len(context))
        unit.shared = next((k for k in range(limit) if head[k] != context[k]), limit)
        unit.indices.append(i)
    return units


def unit_tokens(samples: Sequence[TrainSample], unit: PackUnit) -> int:
    """Packed length of a unit: its shared prefix once, then each member without it."""
    if len(unit.indices) == 1:
        return len(samples[unit.indices[0]].tokens)
    return unit.shared + sum(len(samples[i].tokens) - unit.shared for i in unit.indices)


def _segments(samples: Sequence[TrainSample], units: Sequence[PackUnit]) -> list[tuple]:
    """(tokens, num_context, sample index or None, first position, prefix segment or -1)."""
    segments: list[tuple] = []
    for unit in units:
        if len(unit.indices) == 1:
            only = samples[unit.indices[0]]
            segments.append((only.tokens, only.num_context, unit.indices[0], 0, -1))
            continue
        shared = unit.shared
        prefix = len(segments)
        segments.append((samples[unit.indices[0]].tokens[:shared], shared, None, 0, -1))
        for i in unit.indices:
            sample = samples[i]
            segments.append(
                (sample.tokens[shared:], sample.num_context - shared, i, shared, prefix)
            )
    return segments


def pack_samples(
    samples: Sequence[TrainSample],
    indices: Sequence[int],
    *,
    pad_to_multiple: int = 1,
    share_prefixes: bool = False,
) -> TrainMicroBatch:
    """Pack ``samples[indices]`` into one THD micro-batch (see the module docstring).

    ``share_prefixes`` packs samples of one context as the context once plus one continuation
    each (:func:`prefix_units`). ``pad_to_multiple`` appends an ignored padding sequence so the
    pack length divides it (sequence parallelism needs the token count divisible by TP).
    """
    chosen = [samples[i] for i in indices]
    units = [
        PackUnit([indices[k] for k in unit.indices], unit.shared)
        for unit in prefix_units(chosen, share_prefixes)
    ]
    return _pack_units(samples, units, pad_to_multiple)


def _pack_units(
    samples: Sequence[TrainSample], units: Sequence[PackUnit], pad_to_multiple: int
) -> TrainMicroBatch:
    indices = [i for unit in units for i in unit.indices]
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
    prefix_of: list[int] = []
    sample_ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for tokens, p, index, first_position, prefix in _segments(samples, units):
        n = len(tokens)
        ids.extend(tokens)
        positions.extend(range(first_position, first_position + n))
        labels.extend([*tokens[1:], 0])
        prefix_of.append(prefix)
        if index is None:  # a shared context: no targets of its own
            for field_values, fill in ((loss_type, IGNORE), (weight, 0.0), (adv, 0.0)):
                field_values.extend([fill] * n)
            if with_old:
                old.extend([0.0] * n)
            if with_ref:
                ref.extend([0.0] * n)
            bounds.append(bounds[-1] + n)
            continue
        sample = samples[index]
        sample_ids.append(index)
        spans.append((bounds[-1], bounds[-1] + n))
        # Position i predicts token i + 1; targets are tokens p .. n-1.
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
        prefix_of.append(-1)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if len(bounds) > 1 else 0
    position_ids = torch.tensor(positions, dtype=torch.long)
    params = PackedSegments(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        positions=position_ids,
        prefix_of=tuple(prefix_of) if any(p >= 0 for p in prefix_of) else None,
    )
    inputs = MicroBatch(
        torch.tensor(ids, dtype=torch.long).unsqueeze(0), position_ids.unsqueeze(0), params
    )
    return TrainMicroBatch(
        inputs=inputs,
        labels=torch.tensor(labels, dtype=torch.long),
        loss_type=torch.tensor(loss_type, dtype=torch.int8),
        token_weight=torch.tensor(weight, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        old_logprobs=torch.tensor(old, dtype=torch.float32) if with_old else None,
        ref_logprobs=torch.tensor(ref, dtype=torch.float32) if with_ref else None,
        sample_ids=sample_ids,
        sample_spans=spans,
    )


class SequenceTooLongError(ValueError):
    """A training sample is longer than ``model.max_seq_len``."""


def check_sequence_lengths(samples: Sequence[TrainSample], max_seq_len: int) -> None:
    """Raise SequenceTooLongError naming the first sample longer than ``max_seq_len``."""
    for index, sample in enumerate(samples):
        if len(sample.tokens) > max_seq_len:
            raise SequenceTooLongError(
                f"training sample {index} ({sample.term}, prompt {sample.prompt_id!r}) has "
                f"{len(sample.tokens)} tokens, more than model.max_seq_len={max_seq_len}; raise "
                "model.max_seq_len or lower data.max_prompt_tokens, rollout.max_new_tokens or "
                "reflection.max_new_tokens"
            )


def pack_micro_batches(
    samples: Sequence[TrainSample],
    max_tokens: int,
    *,
    pad_to_multiple: int = 1,
    share_prefixes: bool = False,
    max_seq_len: int | None = None,
) -> list[TrainMicroBatch]:
    """All of ``samples`` as THD micro-batches of at most ``max_tokens`` tokens each; a unit of
    samples sharing a prefix (:func:`prefix_units`) is never split across micro-batches. With
    ``max_seq_len``, a sample longer than it is a SequenceTooLongError."""
    if max_seq_len is not None:
        check_sequence_lengths(samples, max_seq_len)
    units = prefix_units(samples, share_prefixes, max_tokens)
    plan = plan_micro_batches([unit_tokens(samples, u) for u in units], max_tokens)
    return [_pack_units(samples, [units[u] for u in group], pad_to_multiple) for group in plan]


def shard_for_data_parallel(
    samples: Sequence[TrainSample],
    dp_rank: int,
    dp_size: int,
    *,
    share_prefixes: bool = False,
    max_tokens: int | None = None,
) -> list[int]:
    """This rank's share, as indices into ``samples`` in ascending order: packing units
    (:func:`prefix_units`) dealt longest-first to the rank with the fewest tokens.

    Deterministic, so every rank computes the same assignment without communication.
    """
    units = prefix_units(samples, share_prefixes, max_tokens)
    sizes = [unit_tokens(samples, unit) for unit in units]
    order = sorted(range(len(units)), key=lambda u: (-sizes[u], u))
    loads = [0] * dp_size
    owner = [0] * len(samples)
    for u in order:
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        for index in units[u].indices:
            owner[index] = rank
        loads[rank] += sizes[u]
    return [i for i in range(len(samples)) if owner[i] == dp_rank]
