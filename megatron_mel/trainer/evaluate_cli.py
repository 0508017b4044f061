"""``megatron-mel eval``: evaluate an HF model on the recipe's benchmarks, no training.

Runs in one process with the recipe's rollout engine (embedded by default) and verifier, prints
the per-benchmark table (problems, Pass@1, Avg@k, Pass@k with counts) and writes it beside the
run directory. The formatter, reward pool, engine, benchmarks and EvalSpec come from the same
builders as the training loop's evaluation. To evaluate a training checkpoint, export it first
with ``tools/convert_checkpoint.py mcore-to-hf`` and pass ``--hf-dir``.
"""

from __future__ import annotations

from pathlib import Path

from megatron_mel.config import ConfigError, RunConfig
from megatron_mel.data.datasets import load_benchmarks
from megatron_mel.models.arch import load_arch
from megatron_mel.trainer.build import build_engine, build_formatter, build_reward_pool
from megatron_mel.trainer.evaluation import BenchmarkResult, EvalSpec, evaluate, markdown_table


def evaluate_model(cfg: RunConfig) -> list[BenchmarkResult]:
    """Evaluate ``cfg.model.hf_dir`` on ``cfg.data.eval_paths`` as the trainer's eval does."""
    if not cfg.data.eval_paths:
        raise ConfigError("data.eval_paths: no benchmarks to evaluate")
    benchmarks = load_benchmarks(cfg.data, limit=cfg.trainer.eval_limit)
    arch = load_arch(cfg.model.hf_dir)
    formatter = build_formatter(cfg.model, cfg.data)
    spec = EvalSpec.from_config(cfg.trainer, cfg.reward, seed=cfg.launch.seed)
    engine = build_engine(cfg.model, cfg.rollout, cfg.launch, arch)
    try:
        with build_reward_pool(cfg.reward) as pool:
            return evaluate(engine, formatter, pool, benchmarks, spec)
    finally:
        engine.shutdown()


def run_eval(cfg: RunConfig) -> int:
    results = evaluate_model(cfg)
    table = markdown_table(results)
    out = Path(cfg.launch.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.md").write_text(table + "\n")
    print(table)
    print(f"written to {out / 'eval.md'}")
    return 0
