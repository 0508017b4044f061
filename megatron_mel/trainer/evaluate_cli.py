"""``megatron-mel eval``: evaluate an HF model on the recipe's benchmarks, no training.

Runs in one process with the recipe's rollout engine (embedded by default) and verifier, prints
the per-benchmark table (problems, Pass@1, Avg@k, Pass@k with counts) and writes it beside the
run directory. To evaluate a training checkpoint, export it first with
``tools/convert_checkpoint.py mcore-to-hf`` and pass ``--hf-dir``.
"""

from __future__ import annotations

from pathlib import Path

from megatron_mel.config import ConfigError, RunConfig
from megatron_mel.data.datasets import load_problems
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.models.arch import load_arch
from megatron_mel.rewards.verifier import RewardPool
from megatron_mel.trainer.build import build_engine
from megatron_mel.trainer.evaluation import BenchmarkResult, EvalSpec, evaluate, markdown_table


def evaluate_model(cfg: RunConfig) -> list[BenchmarkResult]:
    """Evaluate ``cfg.model.hf_dir`` on ``cfg.data.eval_paths`` as the trainer's eval does."""
    if not cfg.data.eval_paths:
        raise ConfigError("data.eval_paths: no benchmarks to evaluate")
    keys = dict(id_key=cfg.data.id_key, question_key=cfg.data.question_key,
                answer_key=cfg.data.answer_key)  # fmt: skip
    benchmarks = {
        name: load_problems(path, **keys)[: cfg.trainer.eval_limit]
        for name, path in cfg.data.eval_paths.items()
    }
    arch = load_arch(cfg.model.hf_dir)
    formatter = PromptFormatter.from_dir(cfg.model.hf_dir, apply_chat_template=cfg.data.apply_chat_template,
                                         solve_template=cfg.data.prompt_template)  # fmt: skip
    engine = build_engine(cfg, arch)
    spec = EvalSpec(k=cfg.trainer.eval_k, temperature=cfg.trainer.eval_temperature,
                    max_new_tokens=cfg.trainer.eval_max_new_tokens or cfg.rollout.max_new_tokens,
                    seed=cfg.launch.seed, score_truncated=cfg.reward.score_truncated)  # fmt: skip
    try:
        with RewardPool.from_config(cfg.reward) as pool:
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
