"""The chunked fused loss equals the naive full-logits reference (loss, log-probs, entropy and
both gradients), and bad inputs fail loudly."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mel.algorithms.token_loss import TokenLossParams
from megatron_mel.ops import fused_combined_loss
from tests.unit.loss_cases import CASES, build, check_case, tolerance


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_chunked_matches_reference(case):
    errors = check_case(case, kernels="torch")
    assert max(errors.values()) <= tolerance(case), errors


def test_clip_case_really_clips_on_both_sides():
    case = next(c for c in CASES if c.name == "clip-both-sides")
    data = build(case)
    out = fused_combined_loss(
        data["hidden_seed"], data["weight"], data["labels"], data["loss_type"],
        data["token_weight"], data["advantages"], data["old_logprobs"], case.params(),
    )  # fmt: skip
    ratio = torch.exp(out.logprobs - data["old_logprobs"])
    adv = data["advantages"]
    assert (out.clipped & (ratio > 1.28) & (adv > 0)).any()  # clipped above
    assert (out.clipped & (ratio < 0.8) & (adv < 0)).any()  # clipped below
    assert 0.0 < out.clip_fraction < 1.0


def test_logprobs_are_zero_on_ignored_tokens_and_output_unpacks_as_pair():
    case = next(c for c in CASES if c.name == "mixed")
    data = build(case)
    out = fused_combined_loss(
        data["hidden_seed"], data["weight"], data["labels"], data["loss_type"],
        data["token_weight"], data["advantages"], data["old_logprobs"],
    )  # fmt: skip
    loss, logprobs = out
    assert loss.dim() == 0 and logprobs.shape == (case.tokens,)
    ignored = data["loss_type"] == 0
    assert torch.all(logprobs[ignored] == 0) and torch.all(logprobs[~ignored] < 0)
    assert out.num_pg_tokens + out.num_nll_tokens == int((~ignored).sum())


def _inputs(t=6, h=8, v=50):
    return dict(
        hidden=torch.randn(t, h),
        weight=torch.randn(v, h),
        labels=torch.randint(0, v, (t,)),
        loss_type=torch.ones(t, dtype=torch.int8),
        token_weight=torch.ones(t),
        advantages=torch.zeros(t),
        old_logprobs=torch.zeros(t),
    )


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (dict(hidden=torch.randn(6, 9)), r"hidden size mismatch"),
        (dict(hidden=torch.randn(6, 8, dtype=torch.float64)), r"share one float dtype"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels must be \[T\] = \[6\]"),
        (dict(labels=torch.zeros(6, dtype=torch.int32)), r"labels must be int64"),
        (dict(labels=torch.tensor([0, 1, 2, 50, 4, 5])), r"label 50 of token 3 is outside the vocabulary \[0, 50\)"),
        (dict(labels=torch.tensor([0, -1, 2, 3, 4, 5])), r"label -1 of token 1"),
        (dict(loss_type=torch.tensor([0, 1, 3, 1, 1, 1], dtype=torch.int8)), r"token 2 has 3"),
        (dict(loss_type=torch.ones(6)), r"loss_type must be an integer tensor"),
        (dict(advantages=torch.tensor([0, 0, float("nan"), 0, 0, 0.0])), r"advantages has non-finite"),
        (dict(token_weight=torch.ones(6, dtype=torch.long)), r"token_weight must be floating point"),
    ],
)  # fmt: skip
def test_bad_inputs_are_clear_errors(patch, message):
    args = {**_inputs(), **patch}
    with pytest.raises(ValueError, match=message):
        fused_combined_loss(**args)


def test_label_out_of_range_is_fine_on_ignored_tokens():
    args = _inputs()
    args["labels"] = torch.tensor([0, 1, 2, -100, 4, 5])
    args["loss_type"] = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.int8)
    loss, _ = fused_combined_loss(**args)
    assert torch.isfinite(loss)


def test_kl_needs_reference_logprobs():
    with pytest.raises(ValueError, match=r"kl_coef > 0 needs ref_logprobs"):
        fused_combined_loss(**_inputs(), params=TokenLossParams(kl_coef=0.1))
    # The KL term applies to PG tokens only: a pack of NLL tokens needs no reference.
    nll_only = {**_inputs(), "loss_type": torch.full((6,), 2, dtype=torch.int8)}
    with_kl = fused_combined_loss(**nll_only, params=TokenLossParams(kl_coef=0.1))
    assert torch.equal(with_kl.loss, fused_combined_loss(**nll_only).loss)


class _OpLog(TorchDispatchMode):
    """Records (op name, output shape) of every aten op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.calls.append((func.overloadpacket.__name__, shape))
        return out


_ALLOCATORS = {"zeros", "zeros_like", "empty", "empty_like", "new_zeros", "new_empty", "full"}
_GEMMS = {"mm", "addmm", "addmm_", "bmm", "matmul"}


def _ops(grad: bool) -> list[tuple[str, tuple[int, ...] | None]]:
    args = _inputs(t=6, h=8, v=50)
    # The recompute's weight is the model's output layer: a Parameter that requires grad.
    args["weight"] = torch.nn.Parameter(args["weight"])
    args["hidden"] = args["hidden"].requires_grad_(True)
    log = _OpLog()
    with torch.set_grad_enabled(grad), log:
        loss, logprobs = fused_combined_loss(**args, chunk_bytes=4 * 50 * 2)  # 3 chunks
    assert torch.isfinite(logprobs).all() and (loss.grad_fn is None) != grad
    return log.calls


def test_forward_only_skips_gradient_buffers():
    """Under no_grad (the log-prob recompute) no [V, H] / [T, H] gradient buffer is allocated
    and only the logits GEMM runs, once per chunk, although the weight requires grad."""
    forward_only = _ops(grad=False)
    assert not [c for c in forward_only if c[0] in _ALLOCATORS and c[1] in ((50, 8), (6, 8))]
    assert sum(name in _GEMMS for name, _ in forward_only) == 3
    # The same call with gradients on does allocate them and runs three GEMMs per chunk, so
    # the recorder sees what the assertions above look for.
    training = _ops(grad=True)
    assert [c for c in training if c[0] in _ALLOCATORS and c[1] == (50, 8)]
    assert sum(name in _GEMMS for name, _ in training) == 9


def test_padded_vocabulary_rows_leave_the_softmax():
    """With vocab_size, padded rows (even non-zero ones) change nothing and get no gradient;
    without it they would enter the softmax."""
    args = _inputs(t=6, h=8, v=40)
    weight = torch.cat([args["weight"], torch.randn(8, 8)]).requires_grad_(True)
    real = args["weight"].clone().requires_grad_(True)
    padded = fused_combined_loss(**{**args, "weight": weight}, vocab_size=40)
    plain = fused_combined_loss(**{**args, "weight": real})
    torch.testing.assert_close(padded.logprobs, plain.logprobs, rtol=0, atol=1e-6)
    (d_weight,) = torch.autograd.grad(padded.loss, weight)
    (d_real,) = torch.autograd.grad(plain.loss, real)
    assert torch.equal(d_weight[40:], torch.zeros(8, 8))
    torch.testing.assert_close(d_weight[:40], d_real, rtol=1e-6, atol=1e-7)
    unmasked = fused_combined_loss(**{**args, "weight": weight.detach()})
    assert (unmasked.logprobs - plain.logprobs).abs().max() > 1e-3
    with pytest.raises(
        ValueError, match=r"label 45 of token 0 is outside the vocabulary \[0, 40\)"
    ):
        bad = args["labels"].clone()
        bad[0] = 45
        fused_combined_loss(**{**args, "weight": weight.detach(), "labels": bad}, vocab_size=40)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 48\]"):
        fused_combined_loss(**{**args, "weight": weight.detach()}, vocab_size=49)


@pytest.mark.parametrize("kernels", ["torch", "reference"])
def test_on_policy_equals_old_logprobs_of_the_same_weights(kernels):
    """old_logprobs=None (pi_old = the current policy) gives the loss and gradients of passing
    the current log-probs explicitly: rho = 1, gradient -A d logp, nothing clipped."""
    from megatron_mel.ops.reference import reference_combined_loss

    case = next(c for c in CASES if c.name == "clip-both-sides")
    data = build(case)
    current = fused_combined_loss(
        data["hidden_seed"], data["weight"], data["labels"], data["loss_type"],
        data["token_weight"], data["advantages"], data["old_logprobs"],
    ).logprobs  # fmt: skip
    results = []
    for old in (None, current):
        hidden = data["hidden_seed"].clone().requires_grad_(True)
        weight = data["weight"].clone().requires_grad_(True)
        args = (hidden, weight, data["labels"], data["loss_type"], data["token_weight"],
                data["advantages"], old)  # fmt: skip
        if kernels == "reference":
            loss, _, _, clipped = reference_combined_loss(*args)
        else:
            out = fused_combined_loss(*args, kernels=kernels)
            loss, clipped = out.loss, out.clipped
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad, clipped))
    (loss0, dh0, dw0, clipped0), (loss1, dh1, dw1, _) = results
    assert not clipped0.any()
    assert torch.allclose(loss0, loss1, rtol=1e-6, atol=1e-7)
    assert torch.allclose(dh0, dh1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(dw0, dw1, rtol=1e-5, atol=1e-7)


def test_the_training_loss_reads_the_device_only_for_its_input_checks_and_active_rows():
    """On a GPU every read of a device value is a stall: the loss function of the actor keeps
    its metrics as one tensor (read once per micro-batch by the actor, after the schedule). It
    reads the device for the batched input checks and the count of active rows only."""
    from megatron_mel.algorithms.aggregation import AggregationSpec, assign_token_weights
    from megatron_mel.algorithms.loss import METRICS, make_loss
    from megatron_mel.config import AlgorithmConfig
    from megatron_mel.data.packing import TrainSample, pack_samples

    samples = [
        TrainSample(tokens=[3, 4, 5, 6, 7], num_context=2, term="pg", advantage=1.0,
                    old_logprobs=[-1.0, -2.0, -1.5], prompt_id="a", group_size=1),
        TrainSample(tokens=[3, 9, 8, 2], num_context=2, term="me", prompt_id="a", group_size=1),
    ]  # fmt: skip
    assign_token_weights(samples, AggregationSpec(num_prompts=1), None)
    batch = pack_samples(samples, [0, 1])
    hidden = torch.randn(batch.labels.numel(), 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    log = _OpLog()
    with log:
        out = make_loss(AlgorithmConfig(), vocab_size=50, kernels="torch")(
            hidden, weight, batch, None
        )
    reads = [name for name, _ in log.calls if name in ("_local_scalar_dense", "nonzero", "item")]
    assert reads == ["nonzero"], reads  # the active rows; the checks' one read is a tolist
    assert out.metrics.shape == (len(METRICS),) and not out.metrics.requires_grad
    sums = dict(zip(METRICS, out.metrics.tolist()))
    assert (sums["pg_tokens"], sums["nll_tokens"]) == (3.0, 2.0)
