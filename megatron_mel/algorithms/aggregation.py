"""Per-token weights that turn the batch loss into a plain sum over tokens.

Every loss term of a step (the policy gradient, an RFT NLL on correct responses, the
meta-experience NLL) is an average whose denominator spans the whole global batch. We compute
those denominators once per step, before the micro-batch loop, by summing local counts over the
data-parallel group; each token then carries ``token_weight = coef / denominator`` and the loss is
``sum_t token_weight_t * l_t`` on every micro-batch. Summing micro-batch losses over micro-batches
and ranks (no averaging anywhere else) gives the exact global objective, whatever the split.

PG modes (``algorithm.loss_agg``), for a response y_i with |y_i| tokens, N_seq responses and
N_tok response tokens in the batch:

    token-mean                w = 1 / N_tok
    seq-mean-token-mean       w = 1 / (|y_i| N_seq)            (paper Eq. 10)
    seq-mean-token-sum-norm   w = 1 / (L N_seq), L = the response budget (Dr.GRPO)

NLL modes (``algorithm.nll_norm``) for a kept meta-experience M (Eq. 7), times ``nll_coef``:

    per_me       w = 1 / (|M| N_M)                              mean over kept M
    per_prompt   w = 1 / (|M| K_x B)    K_x kept M of its prompt, B prompts in the batch
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mel import platform
from megatron_mel.data.packing import TrainSample

PG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
NLL_MODES = ("per_me", "per_prompt")


@dataclass(frozen=True, slots=True)
class TermCounts:
    """Global token and sequence counts of each loss term (summed over data-parallel ranks)."""

    tokens: dict[str, int]
    sequences: dict[str, int]


def count_terms(
    samples: Sequence[TrainSample], dp_group: dist.ProcessGroup | None = None
) -> TermCounts:
    """Count target tokens and sequences per term; collective over ``dp_group`` when given."""
    terms = sorted(TrainSample.TERMS)
    counts = [[0.0] * len(terms), [0.0] * len(terms)]
    for sample in samples:
        column = terms.index(sample.term)
        counts[0][column] += sample.num_targets
        counts[1][column] += 1
    local = torch.tensor(counts, dtype=torch.float64)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        reduced = platform.collective_tensor(local, dtype=torch.float64, group=dp_group)
        dist.all_reduce(reduced, group=dp_group)
        local = reduced.cpu()
    return TermCounts(
        tokens={t: int(local[0, i]) for i, t in enumerate(terms)},
        sequences={t: int(local[1, i]) for i, t in enumerate(terms)},
    )


@dataclass(frozen=True, slots=True)
class AggregationSpec:
    pg_mode: str = "seq-mean-token-mean"
    nll_mode: str = "per_me"
    nll_coef: float = 1.0
    """Weight of the meta-experience term (the RFT term, a base loss, has weight 1)."""
    sum_norm_length: int = 4096
    """L of seq-mean-token-sum-norm: the response token budget."""
    num_prompts: int = 1
    """B, prompts in the global batch (per_prompt normalisation)."""

    def __post_init__(self) -> None:
        if self.pg_mode not in PG_MODES:
            raise ValueError(f"loss_agg must be one of {PG_MODES}, got {self.pg_mode!r}")
        if self.nll_mode not in NLL_MODES:
            raise ValueError(f"nll_norm must be one of {NLL_MODES}, got {self.nll_mode!r}")


def sample_token_weight(sample: TrainSample, counts: TermCounts, spec: AggregationSpec) -> float:
    """The weight every target token of ``sample`` carries (see the module docstring)."""
    n = sample.num_targets
    if n == 0:
        return 0.0
    seqs = counts.sequences[sample.term]
    if sample.term in ("pg", "rft"):
        if spec.pg_mode == "token-mean":
            return 1.0 / counts.tokens[sample.term]
        if spec.pg_mode == "seq-mean-token-mean":
            return 1.0 / (n * seqs)
        return 1.0 / (spec.sum_norm_length * seqs)
    # Meta-experience NLL.
    if spec.nll_mode == "per_me":
        return spec.nll_coef / (n * seqs)
    return spec.nll_coef / (n * sample.group_size * spec.num_prompts)


def assign_token_weights(
    samples: Sequence[TrainSample],
    spec: AggregationSpec,
    dp_group: dist.ProcessGroup | None = None,
) -> TermCounts:
    """Set ``sample.token_weight`` on this rank's samples from global counts; return them."""
    counts = count_terms(samples, dp_group)
    for sample in samples:
        sample.token_weight = sample_token_weight(sample, counts, spec)
    return counts
