"""The reflection stage on a real instruct model: rollout -> verify -> reflection -> replay.

    python benchmarks/bench_reflection.py --model Qwen2.5-Coder-0.5B-Instruct [--prompts N]
    python benchmarks/bench_reflection.py --model SmolLM2-135M-Instruct

One MEL step without training (MEL.md steps 1-6) on ``N`` real prompts, three quarters from
GSM8K test and a quarter from MATH-500 (``--math500-share``; the first ones of a seeded shuffle;
a 0.5B model rarely solves a MATH-500 problem, and only prompts it sometimes solves give mixed
groups), through the same code the trainer runs:
the embedded engine, the math-verify reward pool (strict: ``\\boxed{}`` or ``####``; ``--reward
flexible`` for models that never box), and :class:`~megatron_mel.reflection.service.Reflector`
with the built-in templates and the full replay filter. ``--model`` names an asset; a missing
one is built (the Qwen asset is opt-in and installs its wheels, see megatron_mel/assets).

Printed: seconds and generated tokens per phase, reward, mixed groups, pairs, candidates, kept,
retention, M truncation rate, four-section parse rate, leak rate, mean M length, and a last line

    reflection model=<name> candidates=<n> kept=<k> retention=<r> sections=<s>

Every candidate M (kept or not, with why and its replay) goes to ``--out``/meta_experiences.jsonl,
the rollout groups with their rewards to ``--out``/rollouts.jsonl.

Budgets are CPU-sized (fp32, 2 cores: ~25-40 generated tokens/s for the 0.5B model): G=4
samples per prompt instead of the paper's 8, at most ``--max-pairs`` analyses per mixed group
(MEL.md's knob; default all), a 768-token analysis budget instead of 2048 and 512-token
responses. None of this changes the method: every candidate is still replayed once with M in
its prompt and kept only if that replay verifies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

REWARDS = {
    "strict": "megatron_mel.rewards.verifier:math_reward",
    "flexible": "megatron_mel.rewards.verifier:flexible_math_reward",
}


def _problems(data: dict[str, Path], count: int, math_share: float, seed: int):
    from megatron_mel.data.datasets import load_problems

    keys = {"id_key": "id", "question_key": "question", "answer_key": "answer"}
    chosen = []
    math = round(count * math_share)
    for split, n in (("gsm8k_test", count - math), ("math500", math)):
        problems = load_problems(data[split], **keys)
        random.Random(f"{seed}:{split}").shuffle(problems)
        chosen += problems[:n]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen2.5-Coder-0.5B-Instruct", help="asset name")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--math500-share", type=float, default=0.25,
                        help="share of the prompts from MATH-500 (the rest: GSM8K test)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=4, help="G: responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="response budget")
    parser.add_argument("--reflection-max-new-tokens", type=int, default=768)
    parser.add_argument("--max-pairs", type=int, default=2, help="analyses per mixed group")
    parser.add_argument("--temperature", type=float, default=1.0)
    # Qwen publishes temperature 0.7, top_p 0.8, top_k 20 for its instruct models; the GGUF
    # asset carries no generation config, so these are the caller's to set.
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--reward", choices=sorted(REWARDS), default="strict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/bench_reflection/M")
    args = parser.parse_args()

    import torch

    from megatron_mel.assets import model_dir, prepare_assets
    from megatron_mel.config import DataConfig, ReflectionConfig, RolloutConfig
    from megatron_mel.data.prompts import PromptFormatter
    from megatron_mel.reflection.service import Reflector
    from megatron_mel.reflection.store import ExperienceStore
    from megatron_mel.reflection.templates import ReflectionTemplates
    from megatron_mel.rewards.verifier import RewardPool
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from megatron_mel.rollout.engine import SamplingParams
    from megatron_mel.rollout.groups import generate_groups
    from megatron_mel.timing import PhaseTimer
    from megatron_mel.trainer.phases import verify_groups

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_dir = model_dir(args.model)
    data = prepare_assets(model=False).data
    problems = _problems(data, args.prompts, args.math500_share, args.seed)
    out = args.out or Path("runs") / "bench_reflection" / args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta_experiences.jsonl").unlink(missing_ok=True)

    formatter = PromptFormatter.from_dir(hf_dir, solve_template=DataConfig().prompt_template)
    engine = EmbeddedEngine.from_hf(hf_dir, max_batch_size=64, seed=args.seed)
    rollout = RolloutConfig(samples_per_prompt=args.samples, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens)  # fmt: skip
    reflection = ReflectionConfig(max_new_tokens=args.reflection_max_new_tokens,
                                  replay_max_new_tokens=args.max_new_tokens,
                                  max_pairs_per_prompt=args.max_pairs)  # fmt: skip
    timer = PhaseTimer()
    with RewardPool(REWARDS[args.reward], num_workers=2, timeout_s=10.0) as pool:
        params = SamplingParams(n=args.samples, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens,
                                stop_token_ids=formatter.stop_token_ids, seed=args.seed)  # fmt: skip
        with timer("rollout"):
            groups = generate_groups(engine, formatter, problems, params,
                                     request_prefix="rollout/1")  # fmt: skip
        with timer("reward"):
            metrics = verify_groups(pool, groups)
        reflector = Reflector(reflection, ReflectionTemplates(), formatter, pool, rollout=rollout,
                              score_truncated=False, max_seq_len=16384, seed=args.seed)  # fmt: skip
        outcome = reflector.run(engine, groups, step=1, timer=timer)
    seconds = timer.seconds
    ExperienceStore(out).append(outcome.records)
    with (out / "rollouts.jsonl").open("w") as handle:
        for group in groups:
            handle.write(json.dumps({"id": group.problem.id, "answer": group.problem.answer,
                                     "rewards": group.rewards, "texts": group.texts,
                                     "truncated": [c.truncated for c in group.completions]})
                         + "\n")  # fmt: skip
    tokens = {"rollout": sum(len(c.token_ids) for g in groups for c in g.completions),
              **outcome.generated_tokens}  # fmt: skip
    m = {**metrics, **outcome.metrics}
    summary = {
        "model": args.model,
        "prompts": len(problems),
        "samples_per_prompt": args.samples,
        "seconds": seconds,
        "tokens": tokens,
        "metrics": m,
        "reasons": _reasons(outcome.records),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"model {args.model}: {len(problems)} prompts (GSM8K test + MATH-500) x G={args.samples}")
    for phase in ("rollout", "reward", "reflection", "replay"):
        toks = tokens.get(phase)
        rate = f", {toks / seconds[phase]:.1f} tok/s" if toks and seconds[phase] else ""
        print(f"  {phase:<10} {seconds[phase]:8.1f} s  {toks if toks is not None else '-':>7} "
              f"tokens{rate}")  # fmt: skip
    print(f"  reward mean {m['reward/mean']:.3f}, response length {m['rollout/response_length']:.0f}"
          f", rollout truncation {m['rollout/truncation_rate']:.3f}")  # fmt: skip
    for key in ("mixed_groups", "pairs", "candidates", "kept", "retention", "truncation_rate",
                "too_long", "sections_rate", "heuristics_rate", "leak_rate", "me_length"):  # fmt: skip
        print(f"  mel/{key:<16} {m[f'mel/{key}']:.3f}")
    print(f"  reasons {summary['reasons']}")
    print(f"  records: {out / 'meta_experiences.jsonl'}")
    print(
        f"reflection model={args.model} candidates={int(m['mel/candidates'])} "
        f"kept={int(m['mel/kept'])} retention={m['mel/retention']:.3f} "
        f"sections={m['mel/sections_rate']:.3f}"
    )


def _reasons(records) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        reason = asdict(record)["reason"]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


if __name__ == "__main__":
    main()
