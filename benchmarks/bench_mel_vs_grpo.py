"""MEL vs GRPO: the same recipe, seeds and prompts for N steps each, held-out eval before/after.

    python benchmarks/bench_mel_vs_grpo.py [--steps N] [--recipe examples/tiny_cpu.yaml]

Both runs are ``megatron-mel train RECIPE`` with identical overrides except ``algorithm.name``
(``mel`` = GRPO + the meta-experience NLL term; ``grpo`` without the reflection stage): the same
model, data order (``launch.seed``), sampling seeds, budgets and optimizer. The held-out set is
``--heldout`` problems of the synthetic arithmetic task the CPU recipe trains on, generated from
another seed and with every question that also occurs in the training split removed (GSM8K and
MATH-500 are out of reach of the 135M CPU model: 0 correct). It is evaluated with the trainer's
own evaluation (Pass@1 greedy, Avg@k at the recipe's eval temperature) on the initial model
(before) and by each run's final step (after, on the engine's synced weights).

Printed: a table of Pass@1 and Avg@k before/after per run with 95% Wilson intervals, the
training reward of the first and last steps, kept meta-experiences and wall time; the report
plots of both runs (``megatron-mel report``) go to OUT/report. Whatever the numbers say is the
result: with a 135M model, a few prompts per step and N steps on CPU, differences within the
intervals are noise, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
REPO = Path(__file__).resolve().parents[1]


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _heldout(path: Path, count: int, train_path: Path) -> int:
    """Write ``count`` arithmetic problems whose questions do not occur in the training split."""
    from megatron_mel.data.synthetic import arithmetic_problems

    with train_path.open() as handle:
        seen = {json.loads(line)["question"] for line in handle}
    kept = []
    for record in arithmetic_problems(20 * count, seed=1):
        if record["question"] not in seen:
            seen.add(record["question"])
            kept.append({**record, "id": f"heldout/{len(kept)}"})
        if len(kept) == count:
            break
    with path.open("w") as handle:
        for record in kept:
            handle.write(json.dumps(record) + "\n")
    return len(kept)


def _cell(correct: int, trials: int) -> str:
    low, high = wilson(correct, trials)
    return f"{correct / trials:.3f} [{low:.3f}, {high:.3f}] ({correct}/{trials})"


def _after(run_dir: Path, k: int) -> tuple[int, int, int]:
    """(Pass@1 correct, Avg@k correct samples, problems) of the run's final evaluation."""
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    problems = int(last["eval/heldout/problems"])
    return (round(last["eval/heldout/pass_at_1"] * problems),
            round(last[f"eval/heldout/avg_at_{k}"] * problems * k), problems)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "examples" / "tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=80, help="held-out problems")
    parser.add_argument("--eval-k", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs") / "mel_vs_grpo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                        help="extra recipe overrides, applied to both runs")  # fmt: skip
    args = parser.parse_args()

    from megatron_mel.assets import prepare_assets
    from megatron_mel.config import load_config
    from megatron_mel.trainer.evaluate_cli import evaluate_model

    data = prepare_assets().data
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = args.out.resolve() / "heldout.jsonl"
    count = _heldout(heldout, args.heldout, data["arithmetic_train"])
    common = [
        f"trainer.num_steps={args.steps}",
        f"trainer.eval_every={args.steps}",  # evaluate after the last step only
        f"trainer.eval_k={args.eval_k}",
        "trainer.eval_limit=null",
        f"data.eval_paths={{heldout: {heldout}}}",
        f"checkpoint.save_every={args.steps}",
        *args.overrides,
    ]
    before_dir = args.out / "before"
    cfg = load_config(args.recipe, [*common, f"launch.run_dir={before_dir}"])
    start = time.perf_counter()
    (before,) = evaluate_model(cfg)
    seconds = {"before": time.perf_counter() - start}
    rows = {}
    for name in ("mel", "grpo"):
        run_dir = args.out / name
        if run_dir.exists():
            raise SystemExit(f"error: {run_dir} exists (a run there would resume); remove it")
        cmd = [sys.executable, "-m", "megatron_mel.cli", "train", str(args.recipe),
               "--set", f"algorithm.name={name}", "--set", f"launch.run_dir={run_dir}"]  # fmt: skip
        for item in common:
            cmd += ["--set", item]
        print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds[name] = time.perf_counter() - start
        rows[name] = _after(run_dir, args.eval_k)
    subprocess.run([sys.executable, "-m", "megatron_mel.cli", "report", str(args.out / "mel"),
                    str(args.out / "grpo"), "--out", str(args.out / "report")], check=True)  # fmt: skip

    from megatron_mel.report import load_run

    k = args.eval_k
    print(f"\nMEL vs GRPO: {args.recipe.name}, {args.steps} steps each, held-out {count} "
          f"arithmetic problems (Pass@1 greedy, Avg@{k} at the recipe's eval temperature), "
          "95% Wilson intervals")  # fmt: skip
    print(f"| run | Pass@1 before | Pass@1 after | Avg@{k} before | Avg@{k} after | train reward "
          "first -> last | kept M | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, (pass1, sampled, problems) in rows.items():
        run = load_run(args.out / name)
        rewards = run.series("reward/mean")[1]
        kept = run.total("mel/kept")
        print(
            f"| {name} | {_cell(before.pass1_correct, before.problems)} | {_cell(pass1, problems)}"
            f" | {_cell(before.sampled_correct, before.problems * k)} | "
            f"{_cell(sampled, problems * k)} | {rewards[0]:.3f} -> {rewards[-1]:.3f} | "
            f"{'-' if kept is None else int(kept)} | {seconds[name]:.0f} |"
        )
    print(f"(before: the initial model, evaluated once in {seconds['before']:.0f} s; Avg@{k} "
          "intervals treat the k samples of a problem as independent, so they are optimistic)")  # fmt: skip
    (mel1, _, n), (grpo1, _, _) = rows["mel"], rows["grpo"]
    print(f"report: {args.out / 'report' / 'report.md'}")
    print(
        f"mel_vs_grpo steps={args.steps} heldout={count} pass1_before={before.pass1:.3f} "
        f"pass1_mel={mel1 / n:.3f} pass1_grpo={grpo1 / n:.3f}"
    )


if __name__ == "__main__":
    main()
