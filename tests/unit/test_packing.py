"""THD packing: labels shift inside each sequence, never across; loss fields land on targets."""

from __future__ import annotations

import pytest
import torch

from megatron_mel.algorithms.token_loss import IGNORE, NLL, PG
from megatron_mel.data.packing import (
    SequenceTooLongError,
    TrainSample,
    pack_micro_batches,
    pack_samples,
    plan_micro_batches,
    prefix_units,
    shard_for_data_parallel,
)


def test_labels_shift_within_each_sequence():
    a = TrainSample(tokens=[10, 11, 12, 13], num_context=2, term="pg", advantage=0.5,
                    old_logprobs=[-1.0, -2.0], token_weight=0.25)  # fmt: skip
    b = TrainSample(tokens=[20, 21, 22], num_context=1, term="me", token_weight=0.1)
    mb = pack_samples([a, b], [0, 1])
    assert mb.inputs.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert mb.inputs.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert mb.inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 7]
    # a: positions 1, 2 predict targets 12, 13; b: positions 0, 1 predict 21, 22.
    assert mb.loss_type.tolist() == [IGNORE, PG, PG, IGNORE, NLL, NLL, IGNORE]
    active = mb.loss_type != IGNORE
    assert mb.labels[active].tolist() == [12, 13, 21, 22]
    assert mb.old_logprobs[active].tolist() == [-1.0, -2.0, 0.0, 0.0]
    assert mb.advantages[active].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert mb.token_weight[active].tolist() == pytest.approx([0.25, 0.25, 0.1, 0.1])


def test_padding_to_a_multiple_adds_an_ignored_sequence():
    a = TrainSample(tokens=[1, 2, 3], num_context=1, term="pg")
    mb = pack_samples([a], [0], pad_to_multiple=4)
    assert mb.num_tokens == 4
    assert mb.inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 4]
    assert mb.loss_type.tolist()[3] == IGNORE


def test_plan_respects_budget_and_keeps_long_samples_whole():
    assert plan_micro_batches([3, 3, 3], 6) == [[0, 1], [2]]
    assert plan_micro_batches([10, 2], 6) == [[0], [1]]
    batches = pack_micro_batches(
        [TrainSample(tokens=[1] * n, num_context=1, term="pg") for n in (4, 4, 4)], 8
    )
    assert [b.num_tokens for b in batches] == [8, 4]


def test_data_parallel_shards_cover_everything_once_and_balance_tokens():
    samples = [TrainSample(tokens=[1] * n, num_context=1, term="pg") for n in (9, 1, 5, 5, 2, 8)]
    shards = [shard_for_data_parallel(samples, r, 2) for r in range(2)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(samples)))
    assert all(shard == sorted(shard) for shard in shards)  # the original order
    loads = [sum(len(samples[i].tokens) for i in shard) for shard in shards]
    assert abs(loads[0] - loads[1]) <= 2


def test_sample_validation():
    with pytest.raises(ValueError, match="term must be one of"):
        TrainSample(tokens=[1, 2], num_context=1, term="sft")
    with pytest.raises(ValueError, match=r"num_context must be in \[1, 2\]"):
        TrainSample(tokens=[1, 2], num_context=0, term="pg")
    with pytest.raises(ValueError, match="old_logprobs has 2 entries for 1 targets"):
        TrainSample(tokens=[1, 2], num_context=1, term="pg", old_logprobs=[0.0, 0.0])


def test_reference_logprobs_travel_with_the_pack():
    a = TrainSample(tokens=[1, 2, 3], num_context=1, term="pg", ref_logprobs=[-1.0, -2.0])
    mb = pack_samples([a], [0])
    assert mb.ref_logprobs is not None
    assert mb.ref_logprobs[mb.loss_type != IGNORE].tolist() == [-1.0, -2.0]
    assert torch.equal(mb.to(torch.device("cpu")).ref_logprobs, mb.ref_logprobs)


def test_on_policy_samples_pack_without_old_logprobs_and_cannot_mix():
    on = TrainSample(tokens=[1, 2, 3], num_context=1, term="pg", advantage=1.0)
    me = TrainSample(tokens=[4, 5], num_context=1, term="me")
    off = TrainSample(tokens=[1, 2, 3], num_context=1, term="pg", old_logprobs=[-1.0, -2.0])
    assert pack_samples([on, me], [0, 1]).old_logprobs is None
    assert pack_samples([off, me], [0, 1]).old_logprobs is not None
    with pytest.raises(ValueError, match="mixes on-policy PG samples"):
        pack_samples([on, off], [0, 1])


def test_shared_prefix_packs_the_context_once_and_continues_it():
    context = [7, 8, 9, 10, 11]
    a = TrainSample(tokens=[*context, 1, 2], num_context=5, term="pg", advantage=1.0)
    b = TrainSample(tokens=[*context, 3], num_context=5, term="pg", advantage=-1.0)
    c = TrainSample(tokens=[5, 6], num_context=1, term="me")
    mb = pack_samples([a, b, c], [0, 1, 2], share_prefixes=True)
    params = mb.inputs.packed_seq_params
    # [7..10] once, then [11, 1, 2] and [11, 3] continuing it at positions 4.., then c alone.
    assert mb.inputs.input_ids.tolist() == [[7, 8, 9, 10, 11, 1, 2, 11, 3, 5, 6]]
    assert params.cu_seqlens_q.tolist() == [0, 4, 7, 9, 11]
    assert params.prefix_of == (-1, 0, 0, -1)
    assert params.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1]
    active = mb.loss_type != IGNORE
    assert mb.labels[active].tolist() == [1, 2, 3, 6]
    assert mb.advantages[active].tolist() == [1.0, 1.0, -1.0, 0.0]
    assert mb.sample_ids == [0, 1, 2] and mb.sample_spans == [(4, 7), (7, 9), (9, 11)]


def test_contexts_with_a_common_head_share_it_when_that_saves_tokens():
    head = list(range(100, 120))
    # Two meta-experience contexts that differ after the 20-token head, and a sample whose
    # context shares only 2 tokens with them (below MIN_SHARED_PREFIX: packed alone).
    x = TrainSample(tokens=[*head, 1, 2, 3, 50, 51], num_context=23, term="me")
    y = TrainSample(tokens=[*head, 4, 5, 60], num_context=22, term="me")
    z = TrainSample(tokens=[100, 101, 9, 9, 9, 70], num_context=5, term="me")
    units = prefix_units([x, y, z], share=True)
    assert [(u.indices, u.shared) for u in units] == [([0, 1], 20), ([2], 0)]
    mb = pack_samples([x, y, z], [0, 1, 2], share_prefixes=True)
    assert mb.num_tokens == 20 + 5 + 3 + 6
    active = mb.loss_type != IGNORE
    assert mb.labels[active].tolist() == [50, 51, 60, 70]
    assert mb.inputs.packed_seq_params.positions.tolist()[20:28] == [20, 21, 22, 23, 24, 20, 21, 22]
    # A budget the shared unit would exceed keeps the samples apart.
    assert [u.indices for u in prefix_units([x, y, z], share=True, max_tokens=26)] == [
        [0],
        [1],
        [2],
    ]


def test_shared_units_are_never_split():
    context = list(range(10, 20))
    group = [TrainSample(tokens=context + [i] * 5, num_context=10, term="pg") for i in range(4)]
    # Unshared, 4 x 15 tokens need 2 packs of 32; shared, 9 + 4 x 6 = 33 tokens: one unit.
    assert [b.num_tokens for b in pack_micro_batches(group, 32)] == [30, 30]
    shared = pack_micro_batches(group, 33, share_prefixes=True)
    assert [b.num_tokens for b in shared] == [33]
    local = [shard_for_data_parallel(group, r, 2, share_prefixes=True) for r in (0, 1)]
    assert [len(x) for x in local] == [4, 0]


def test_a_sample_longer_than_max_seq_len_is_an_error_naming_the_key():
    ok = TrainSample(tokens=list(range(8)), num_context=4, term="pg")
    long = TrainSample(tokens=list(range(9)), num_context=4, term="me", prompt_id="p7")
    assert len(pack_micro_batches([ok], 64, max_seq_len=8)) == 1
    with pytest.raises(SequenceTooLongError, match=r"sample 1 \(me, prompt 'p7'\) has 9 tokens, "
                       r"more than model.max_seq_len=8"):  # fmt: skip
        pack_micro_batches([ok, long], 64, max_seq_len=8)
