"""The policy actor: Megatron model chunks wrapped for training, the optimizer and LR schedule.

One :meth:`Actor.train_step` is one optimizer step on a global batch of TrainSamples:

1. each data-parallel rank takes its share of samples (every rank computes the same split);
2. token weights come from global counts, all-reduced over data-parallel ranks *before* the
   micro-batch loop (algorithms/aggregation.py), so the loss is a plain sum;
3. the samples are packed into THD micro-batches and run through Megatron's pipeline schedule;
   on the last stage the model's ``output_processor`` hook hands the hidden states and the
   (vocab-parallel) output weight to the fused loss, so logits never exist in full;
4. gradients are summed, not averaged, over micro-batches and data-parallel ranks
   (``calculate_per_token_loss`` with our own finalize step), then one optimizer step.

Every rank of the job calls every public method collectively.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_mel import platform
from megatron_mel.algorithms.aggregation import AggregationSpec, assign_token_weights
from megatron_mel.algorithms.loss import METRICS, LossFunction, make_loss
from megatron_mel.algorithms.token_loss import IGNORE
from megatron_mel.config import AlgorithmConfig, OptimConfig, ParallelConfig
from megatron_mel.convert.checkpoint import unwrap
from megatron_mel.data.packing import (
    TrainMicroBatch,
    TrainSample,
    pack_micro_batches,
    shard_for_data_parallel,
)
from megatron_mel.models.forward import share_from_last_stage
from megatron_mel.ops import fused_combined_loss


class NonFiniteLossError(RuntimeError):
    """The loss of a micro-batch was NaN or infinite; raised on every rank before the update."""


@dataclass(frozen=True, slots=True)
class ActorSettings:
    parallel: ParallelConfig
    optim: OptimConfig
    num_steps: int
    dtype: torch.dtype
    vocab_size: int
    """The model's true vocabulary (ModelArch.vocab_size); the output weight's padding rows
    beyond it stay out of the softmax."""
    max_seq_len: int
    """model.max_seq_len: a longer training sample is an error naming that key."""
    share_prefixes: bool = False
    """Pack samples of one context as the context once plus continuations (data/packing.py);
    needs the local attention, which knows shared prefixes."""


def wrap_for_training(chunks: list[torch.nn.Module], settings: ActorSettings) -> list[DDP]:
    """Wrap model chunks (weights already loaded) in Megatron DDP with summed gradients."""
    config = unwrap(chunks[0]).config
    # Our losses are sums with global weights: gradients must add up over micro-batches and
    # data-parallel ranks. With calculate_per_token_loss, DDP does not pre-scale by 1/DP and the
    # schedule does not divide by the number of micro-batches.
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=settings.parallel.use_distributed_optimizer,
    )
    return [
        DDP(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(
    wrapped: list[DDP], settings: ActorSettings
) -> tuple[Any, OptimizerParamScheduler]:
    optim = settings.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=settings.dtype is torch.bfloat16,
        fp16=settings.dtype is torch.float16,
        params_dtype=settings.dtype,
        use_distributed_optimizer=settings.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(settings.num_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.lr_schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(settings.num_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _finalize_summed_grads(model: Any, num_tokens: Any = None, **kwargs: Any) -> None:
    # The schedule passes the token count to divide by; our token weights already normalise.
    finalize_model_grads(model, None, **kwargs)


class PolicyRunner:
    """Forward passes of model chunks over packed samples: log-probs of target tokens.

    The reference policy of a KL term is one (frozen, unwrapped chunks); the Actor is one that
    also trains.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        parallel: ParallelConfig,
        micro_batch_tokens: int,
        loss_fn: LossFunction | None = None,
        *,
        vocab_size: int,
        max_seq_len: int,
        share_prefixes: bool = False,
    ) -> None:
        self.chunks = chunks
        self.loss_fn = loss_fn
        self.micro_batch_tokens = micro_batch_tokens
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.share_prefixes = share_prefixes
        self.device = next(chunks[0].parameters()).device
        self.sequence_parallel = parallel.sequence_parallel
        self.pad_multiple = parallel.tp if self.sequence_parallel else 1

    # -- log-probs --------------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """log pi(target token) of every target token of ``samples``, on every rank.

        ``samples`` is the same list on every rank; data-parallel replicas each score their
        share and the results are all-gathered. (The training forward yields the same values
        for the policy itself, see Actor.forward_backward; this is for other policies, such as
        the frozen reference of a KL term.)
        """
        for chunk in self.chunks:
            chunk.eval()
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        mine = shard_for_data_parallel(
            samples, dp_rank, dp_size, share_prefixes=self.share_prefixes
        )
        # Every target token as an NLL token: the kernel's log-probs, no policy-gradient inputs.
        targets = [
            TrainSample(tokens=samples[i].tokens, num_context=samples[i].num_context, term="me")
            for i in mine
        ]
        records = self._run_schedule(self._pack(targets), forward_only=True)
        return _gather_logprobs(records, mine, len(samples))

    # -- internals --------------------------------------------------------------------------

    def _pack(
        self, samples: Sequence[TrainSample], max_tokens: int | None = None
    ) -> list[TrainMicroBatch]:
        if not samples:
            # A data-parallel rank without samples still runs the schedule (collectives):
            # give it one ignored padding sequence.
            batches = [_padding_micro_batch(max(1, self.pad_multiple))]
        else:
            budget = max_tokens or self.micro_batch_tokens
            batches = pack_micro_batches(samples, budget, pad_to_multiple=self.pad_multiple,
                                         share_prefixes=self.share_prefixes,
                                         max_seq_len=self.max_seq_len)  # fmt: skip
        for index, batch in enumerate(batches):
            batch.index = index
        return batches

    def _run_schedule(
        self, micro_batches: list[TrainMicroBatch], *, forward_only: bool
    ) -> list[dict[str, Any]]:
        """Run the pipeline schedule; one record per micro-batch (on the last stage) with
        ``micro_batch``, ``loss_sum``, ``logprobs`` (per packed sample) and, when training,
        the loss metrics (algorithms/loss.py METRICS). Everything a record holds is read from
        the device in one transfer per micro-batch, after the schedule."""
        tp_group = ps.get_tensor_model_parallel_group()
        tp_group = tp_group if ps.get_tensor_model_parallel_world_size() > 1 else None

        def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[Any, Any]:
            batch: TrainMicroBatch = next(data_iterator).to(self.device)
            record: dict[str, Any] = {"micro_batch": batch.index}

            def processor(hidden_states: torch.Tensor, output_layer: Any, output_weight: Any,
                          **_: Any) -> torch.Tensor:  # fmt: skip
                weight = output_weight if output_weight is not None else output_layer.weight
                if self.sequence_parallel:
                    hidden_states = gather_from_sequence_parallel_region(
                        hidden_states, tensor_parallel_output_grad=False
                    )
                hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [t, H]
                if forward_only:
                    out = fused_combined_loss(
                        hidden, weight, batch.labels, batch.loss_type, batch.token_weight,
                        batch.advantages, batch.old_logprobs, vocab_size=self.vocab_size,
                        tp_group=tp_group,
                    )  # fmt: skip
                    record["token_logprobs"] = out.logprobs
                    return out.loss
                out = self.loss_fn(hidden, weight, batch, tp_group)
                record["token_logprobs"], record["metrics"] = out.token_logprobs, out.metrics
                return out.loss

            output = model(
                input_ids=batch.inputs.input_ids,
                position_ids=batch.inputs.position_ids,
                attention_mask=None,
                packed_seq_params=batch.inputs.packed_seq_params,
                output_processor=processor,
            )

            def loss_func(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
                record["loss"] = loss.detach()
                return loss, torch.tensor(batch.num_tokens, dtype=torch.int), record

            return output, loss_func

        data_iterators: Any = [iter(micro_batches) for _ in self.chunks]
        max_len = max(mb.num_tokens for mb in micro_batches)
        records = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data_iterators if len(self.chunks) > 1 else data_iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=max_len,
            micro_batch_size=1,
            forward_only=forward_only,
        )
        for record in records:
            _read_record(record, micro_batches[record["micro_batch"]])
        return records


def _read_record(record: dict[str, Any], batch: TrainMicroBatch) -> None:
    """Bring a micro-batch's record to the host in one transfer: the loss, the metric sums and
    the log-probs, split per packed sample (by its index in the packed list) into the log-probs
    of its target tokens. ``batch`` is the host-side micro-batch."""
    metrics = record.pop("metrics", None)
    logprobs = record.pop("token_logprobs")
    parts = [record.pop("loss").reshape(1).double(), logprobs.double()]
    if metrics is not None:
        parts.insert(1, metrics)
    values = torch.cat(parts).cpu()
    record["loss_sum"] = float(values[0])
    if metrics is not None:
        record.update(zip(METRICS, values[1 : 1 + len(METRICS)].tolist()))
    token_logprobs = values[-logprobs.numel() :] if logprobs.numel() else values[:0]
    targets = (batch.loss_type != IGNORE).cpu()
    record["logprobs"] = {
        sample_id: token_logprobs[start:end][targets[start:end]].tolist()
        for sample_id, (start, end) in zip(batch.sample_ids, batch.sample_spans)
    }


def _gather_logprobs(
    records: list[dict[str, Any]], global_index: list[int], num_samples: int
) -> list[list[float]]:
    """Every sample's target log-probs on every rank, from the schedule's records.

    ``global_index[k]`` is the position in the global batch of this rank's k-th packed sample.
    Collective: the last pipeline stage shares its records, data-parallel ranks exchange theirs.
    """
    local: dict[int, list[float]] = {}
    for record in records if global_index else []:  # an empty share ran one padding pack
        for position, values in record["logprobs"].items():
            local[global_index[position]] = values
    local = share_from_last_stage(local)
    gathered: list[dict[int, list[float]]] = [{} for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(num_samples)]


class Actor(PolicyRunner):
    """Training and log-prob computation on the policy's Megatron chunks (see module doc)."""

    def __init__(
        self,
        wrapped: list[DDP],
        optimizer: Any,
        scheduler: OptimizerParamScheduler,
        loss_fn: LossFunction,
        aggregation: AggregationSpec,
        settings: ActorSettings,
    ) -> None:
        super().__init__(wrapped, settings.parallel, settings.optim.micro_batch_tokens, loss_fn,
                         vocab_size=settings.vocab_size, max_seq_len=settings.max_seq_len,
                         share_prefixes=settings.share_prefixes)  # fmt: skip
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.aggregation = aggregation
        self.settings = settings
        config = unwrap(wrapped[0]).config
        config.finalize_model_grads_func = _finalize_summed_grads
        config.grad_scale_func = optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self._grads_released = False

    # -- training -------------------------------------------------------------------------

    def forward_backward(
        self,
        samples: Sequence[TrainSample],
        *,
        step: int,
        num_prompts: int,
        micro_batch_tokens: int | None = None,
    ) -> dict[str, float]:
        """Zero gradients, then accumulate the gradient of the global-batch loss.

        ``samples`` is the whole global batch, identical on every rank. Sets every sample's
        ``train_logprobs`` (on every rank) to the forward's log-probs of its targets. Raises
        NonFiniteLossError on every rank if any micro-batch's loss is not finite.
        """
        spec = AggregationSpec(
            pg_mode=self.aggregation.pg_mode,
            nll_mode=self.aggregation.nll_mode,
            nll_coef=self.aggregation.nll_coef,
            sum_norm_length=self.aggregation.sum_norm_length,
            num_prompts=num_prompts,
        )
        mine = shard_for_data_parallel(
            samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            share_prefixes=self.share_prefixes,
            max_tokens=micro_batch_tokens or self.micro_batch_tokens,
        )  # fmt: skip
        local = [samples[i] for i in mine]
        assign_token_weights(local, spec, ps.get_data_parallel_group())
        micro_batches = self._pack(local, micro_batch_tokens)
        on_gpu = self.device.type == "cuda"
        for chunk in self.chunks:
            if self._grads_released:
                chunk.restore_grad_buffers(synchronize=on_gpu)
            chunk.zero_grad_buffer()
        self._grads_released = False
        self.optimizer.zero_grad()
        records = self._run_schedule(micro_batches, forward_only=False)
        self._check_finite(records, step)
        logprobs = _gather_logprobs(records, mine, len(samples))
        for sample, values in zip(samples, logprobs):
            sample.train_logprobs = values
        return self._reduce_metrics(records)

    def train_step(
        self,
        samples: Sequence[TrainSample],
        *,
        step: int,
        num_prompts: int,
        micro_batch_tokens: int | None = None,
    ) -> dict[str, float]:
        """One optimizer step on the global batch ``samples``; returns the step's metrics."""
        for chunk in self.chunks:
            chunk.train()
        metrics = self.forward_backward(
            samples, step=step, num_prompts=num_prompts, micro_batch_tokens=micro_batch_tokens
        )
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise NonFiniteLossError(f"step {step}: optimizer skipped the update (inf/nan grads)")
        self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self._release_grads()
        return metrics

    def _release_grads(self) -> None:
        """Free the gradient buffers until the next step (they are zeroed before each one and
        read by nothing in between), so rollout and weight sync run without them: a model-sized
        fp32 buffer back to the engines (GPU) or the OS (CPU, with the step's activations)."""
        on_gpu = self.device.type == "cuda"
        for chunk in self.chunks:
            chunk.offload_grad_buffers(synchronize=on_gpu, empty_cache=on_gpu)
        self._grads_released = True
        if not on_gpu:
            platform.release_host_memory()

    def _check_finite(self, records: list[dict[str, Any]], step: int) -> None:
        bad = next((r["micro_batch"] for r in records if not math.isfinite(r["loss_sum"])), -1)
        flag = platform.collective_tensor([bad], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) >= 0:
            raise NonFiniteLossError(
                f"step {step}, micro-batch {int(flag)}: the loss is not finite; the update was "
                "skipped (resume from the last checkpoint, or lower optim.lr)"
            )

    def _reduce_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        keys = ("loss_sum", *METRICS)
        dp_group = ps.get_data_parallel_group()
        totals = platform.collective_tensor(
            [sum(float(r.get(k, 0.0)) for r in records) for k in keys],
            dtype=torch.float64,
            group=dp_group,
        )
        if ps.is_pipeline_last_stage():
            dist.all_reduce(totals, group=dp_group)
        totals = share_from_last_stage(totals.cpu())
        sums = dict(zip(keys, totals.tolist()))
        pg_tokens = max(sums["pg_tokens"], 1.0)
        return {
            "loss": sums["loss_sum"],
            "pg_loss": sums["pg_loss_sum"],
            "nll_loss": sums["nll_loss_sum"],
            "pg_tokens": sums["pg_tokens"],
            "nll_tokens": sums["nll_tokens"],
            "entropy": sums["entropy_sum"] / pg_tokens,
            "clip_fraction": sums["clipped_tokens"] / pg_tokens,
        }


def build_actor(
    chunks: list[torch.nn.Module],
    settings: ActorSettings,
    algorithm: AlgorithmConfig,
    *,
    response_budget: int,
    kernels: str = "auto",
) -> Actor:
    """An Actor over ``chunks`` whose weights are already loaded (the optimizer copies them)."""
    wrapped = wrap_for_training(chunks, settings)
    optimizer, scheduler = build_optimizer(wrapped, settings)
    aggregation = AggregationSpec(
        pg_mode=algorithm.loss_agg,
        nll_mode=algorithm.nll_norm,
        nll_coef=algorithm.nll_coef,
        sum_norm_length=response_budget,
    )
    return Actor(
        wrapped,
        optimizer,
        scheduler,
        make_loss(algorithm, settings.vocab_size, kernels),
        aggregation,
        settings,
    )


def _padding_micro_batch(num_tokens: int) -> TrainMicroBatch:
    from megatron_mel.data.packing import pack_samples

    pad = TrainSample(tokens=[0] * num_tokens, num_context=num_tokens, term="pg")
    return pack_samples([pad], [0])
