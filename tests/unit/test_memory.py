"""The per-GPU memory estimator against numbers computed by hand, for two configurations."""

from __future__ import annotations

import json

import pytest

from megatron_mel import memory
from megatron_mel.config import load_config
from megatron_mel.memory import GIB, estimate, stage_params, training_memory
from megatron_mel.models.arch import arch_from_hf_config
from megatron_mel.plan import SHAPES_DIR
from tests.conftest import REPO

SMALL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1000, "tie_word_embeddings": False}  # fmt: skip


def test_small_model_tp2_pp2_sequence_parallel_by_hand():
    """h=64, ffn=128, 4 layers, 4 heads of 16, 2 KV heads, vocab 1000 -> 1024; bf16, TP=2,
    PP=2, DP=2, sequence parallel, distributed optimizer, 100-token micro-batches."""
    arch = arch_from_hf_config(SMALL)
    cfg = load_config(None, ["model.hf_dir=x", "model.dtype=bfloat16", "parallel.tp=2",
                             "parallel.pp=2", "parallel.sequence_parallel=true",
                             "optim.micro_batch_tokens=100"])  # fmt: skip
    # One layer: q 64x64 + k, v 64x32 each + o 64x64 + gate, up, down 3 x 64x128 = 36864, split
    # over TP=2 -> 18432, plus the two replicated norms 2 x 64 -> 18560 per rank.
    assert memory.layer_params_per_rank(arch, 2) == 18432 + 128
    # Stage 0: 2 layers + the embedding shard 1024 x 64 / 2; stage 1: 2 layers + final norm +
    # the output-layer shard.
    stages = stage_params(arch, tp=2, pp=2, padded_vocab=1024)
    assert [s.count for s in stages] == [2 * 18560 + 32768, 2 * 18560 + 64 + 32768]

    first, last = training_memory(cfg, arch, dp=2)
    assert first.weights == 69888 * 2 and first.grads == 69888 * 4
    assert first.optimizer == 69888 * 12 // 2  # fp32 master + m + v, sharded over DP=2
    assert first.optimizer_without_distributed == 69888 * 12
    # Per token and layer: 4 h = 256 values split by SP -> 128; q 64 + k, v 32 each + attention
    # out 64 + fc1 out 256 + fc2 in 128 = 576 split by TP -> 288; 416 values x 2 bytes = 832.
    # Stage 0 holds 2 micro-batches in flight (1F1B), stage 1 one; 2 layers each, 100 tokens.
    assert first.activations == 2 * 2 * 100 * 832
    assert last.activations == 1 * 2 * 100 * 832
    assert first.loss == 0
    # Last stage: fp32 d_weight (512 x 64), fp32 d_hidden (100 x 64), three 128 MiB chunks.
    assert last.loss == 4 * 512 * 64 + 4 * 100 * 64 + 3 * 128 * 2**20
    assert first.reserve == 2 * GIB


def test_llama3_70b_recipe_on_8x8_h100_by_hand():
    """examples/llama3_70b_h100.yaml: TP=8 PP=4 DP=2, sequence parallel, full recompute,
    16384-token micro-batches, 8 colocated engines of TP=8 at mem_fraction_static 0.45."""
    arch = arch_from_hf_config(json.loads((SHAPES_DIR / "Llama-3.3-70B-Instruct.json").read_text()))
    cfg = load_config(REPO / "examples" / "llama3_70b_h100.yaml")
    # Layer: q, o 8192 x 8192 each, k, v 8192 x 1024 each, MLP 3 x 8192 x 28672 = 855,638,016,
    # / 8 = 106,954,752, + 2 x 8192 replicated norm weights; 20 layers per stage; the embedding
    # shard is 129,024 (128,256 padded to 1024) x 8192 / 8 = 132,120,576.
    per_layer = 106_954_752 + 16_384
    stage0 = 20 * per_layer + 132_120_576
    assert stage0 == 2_271_543_296
    train = training_memory(cfg, arch, dp=2)
    assert [t.params for t in train] == [stage0, 20 * per_layer, 20 * per_layer,
                                         20 * per_layer + 8192 + 132_120_576]  # fmt: skip
    t0 = train[0]
    assert t0.weights == 2 * stage0 and t0.grads == 4 * stage0
    assert t0.optimizer == 12 * stage0 // 2 == 13_629_259_776
    # Recompute: each layer keeps its input, 8192 / 8 (SP) bf16 values per token, for 4 micro-
    # batches x 20 layers in flight; plus one layer re-created in backward: 2 bytes x (4 x 8192
    # / 8 + (2 x 8192 + 2 x 1024 + 3 x 28672) / 8) = 34,304 bytes per token.
    assert t0.activations == 80 * 16384 * 2048 + 16384 * 34_304 == 3_246_391_296

    est = estimate(cfg, arch, dp=2, engine_tp=8, colocated_engines=True,
                   separate_engines=False, gpu_mem_gib=80)  # fmt: skip
    (gpu,) = est.gpus
    engine = gpu.engine
    # Whole model: 80 x (855,638,016 + 16,384) + 2 x 129,024 x 8192 (untied) + 8192 (final
    # norm) = 70,566,289,408 parameters; bf16 over engine TP=8.
    assert engine.weights == 70_566_289_408 * 2 // 8
    assert engine.pool == int(0.45 * 80 * GIB)
    # KV: 2 (k, v) x 80 layers x 1024 / 8 values x 2 bytes = 40,960 bytes per token.
    assert engine.kv_bytes_per_token == 40_960
    assert engine.kv_tokens == (engine.pool - engine.weights) // 40_960 == 513_015
    # Colocated with release: the rollout phase (trainer states + engine pool) is the peak.
    resident = t0.weights + t0.grads + t0.optimizer + 2 * GIB
    assert gpu.phase == "rollout"
    assert gpu.peak == resident + 1 * GIB + engine.pool == 69_134_450_688
    assert est.problems == []


def test_70b_at_tp1_pp1_is_refused_with_the_weights_named():
    arch = arch_from_hf_config(json.loads((SHAPES_DIR / "Llama-3.3-70B-Instruct.json").read_text()))
    cfg = load_config(
        REPO / "examples" / "llama3_70b_h100.yaml", ["parallel.tp=1", "parallel.pp=1"]
    )
    assert cfg.parallel.sequence_parallel is False  # nothing to split at tp=1 (Megatron-LM too)
    est = estimate(cfg, arch, dp=64, engine_tp=8, colocated_engines=True,
                   separate_engines=False, gpu_mem_gib=80)  # fmt: skip
    (problem,) = est.problems
    assert "needs 445.6 GiB" in problem and "weights 131.4 GiB" in problem
    assert "raise parallel.tp or parallel.pp" in problem


def test_engine_pool_too_small_for_its_weights_is_a_problem():
    arch = arch_from_hf_config(json.loads((SHAPES_DIR / "Llama-3.3-70B-Instruct.json").read_text()))
    cfg = load_config(REPO / "examples" / "llama3_70b_h100.yaml",
                      ["rollout.server.mem_fraction_static=0.15"])  # fmt: skip
    est = estimate(cfg, arch, dp=2, engine_tp=8, colocated_engines=True,
                   separate_engines=False, gpu_mem_gib=80)  # fmt: skip
    assert any("does not hold its weights" in p for p in est.problems)


def test_without_release_the_engine_pool_stays_through_training():
    arch = arch_from_hf_config(SMALL)
    base = ["model.hf_dir=x", "rollout.engine=sglang", "rollout.server.mem_fraction_static=0.5"]
    kept = load_config(None, [*base, "rollout.release_memory=false"])
    released = load_config(None, base)
    args = dict(dp=1, engine_tp=1, colocated_engines=True, separate_engines=False, gpu_mem_gib=1)
    a, b = estimate(kept, arch, **args).gpus[0], estimate(released, arch, **args).gpus[0]
    assert a.phase == "training" and a.peak == a.training.training_peak + GIB + GIB // 2
    assert b.peak < a.peak


def test_loss_chunk_constant_matches_the_fused_loss():
    from megatron_mel.ops.fused_loss import DEFAULT_CHUNK_BYTES

    assert memory.LOSS_CHUNK_BYTES == DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize("name", sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
def test_shipped_shapes_parse(name):
    arch = arch_from_hf_config(json.loads((SHAPES_DIR / f"{name}.json").read_text()))
    assert arch.num_layers > 0 and arch.num_heads % arch.num_kv_heads == 0
