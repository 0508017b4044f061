"""What MEL's reflection and replay cost on top of GRPO: the demo recipe run both ways.

    python benchmarks/bench_mel_overhead.py [--steps 5] [--pairs 1] [--work-dir runs/bench_mel]

Runs ``megatron-mel train examples/tiny_cpu.yaml`` (SmolLM2-135M-Instruct, 4 prompts x G=8 on
the synthetic arithmetic task) twice with the same seeds: ``algorithm.name=grpo`` and
``algorithm.name=mel`` (GRPO + reflection on every mixed group, replay validation of each
meta-experience, the NLL term on the kept ones; MEL.md). Evaluation and checkpoints are off, so
a step is rollout, reward, [reflection, replay,] train and weight sync. Step 1 is a warm-up;
steps 2..N are measured.

Per run it prints, per measured step, the seconds and generated tokens of each phase (rollout,
reward, reflection, replay, log-probs if a separate forward ran, train, sync) and the MEL
counts (mixed groups, pairs, kept); then the mean per phase. The last line is

    ratio step_time mel/grpo=<x>

the mean MEL step time over the mean GRPO step time of the measured steps (pairs: the median
of the per-pair ratios). A MEL run where fewer than half of the measured steps had a mixed
group is reported as such (its reflection stage had nothing to do). Run it under the shared
lock (``flock -x /tmp/mel-heavy.lock``): the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "tiny_cpu.yaml"
PHASES = ("rollout", "reward", "reflection", "replay", "logprobs", "train", "sync")
TOKENS = ("rollout", "reflection", "replay")


def run(algorithm: str, steps: int, run_dir: Path) -> list[dict]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = {
        "algorithm.name": algorithm,
        "trainer.num_steps": steps,
        "trainer.eval_every": 0,
        "checkpoint.save_every": 10_000,
        "tracking.backend": "console",
        "launch.run_dir": str(run_dir),
    }
    cmd = [str(Path(sys.executable).parent / "megatron-mel"), "train", str(RECIPE)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode  # fmt: skip
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {algorithm} run exited with {code}; log {log}:\n{tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[1:]  # step 1 is the warm-up


def describe(algorithm: str, rows: list[dict]) -> float:
    print(f"{algorithm}:")
    for r in rows:
        phases = " ".join(f"{p} {r[f'time/{p}']:5.1f}s" for p in PHASES if f"time/{p}" in r)
        tokens = " ".join(f"{t} {int(r[f'tokens/{t}'])}" for t in TOKENS if f"tokens/{t}" in r)
        mel = (
            f" | mixed {int(r['mel/mixed_groups'])} pairs {int(r['mel/pairs'])} "
            f"kept {int(r['mel/kept'])} nll_tokens {int(r.get('train/nll_tokens', 0))}"
            if "mel/pairs" in r
            else ""
        )
        print(f"  step {r['step']}: {r['time/step']:5.1f}s = {phases} | tokens {tokens}{mel}")
    means = {p: statistics.mean(r.get(f"time/{p}", 0.0) for r in rows) for p in PHASES}
    shown = " ".join(f"{p} {v:.1f}s" for p, v in means.items() if v)
    step = statistics.mean(r["time/step"] for r in rows)
    print(f"  mean over {len(rows)} measured steps: {step:.1f}s ({shown})")
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per run, the first a warm-up")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_mel")
    args = parser.parse_args()
    if args.steps < 5:
        raise SystemExit("error: --steps must be >= 5 (1 warm-up + at least 4 measured steps)")
    work = args.work_dir.resolve()
    print(f"recipe {RECIPE.relative_to(REPO)}, {args.steps} steps per run (1 warm-up), "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)  # fmt: skip
    ratios = []
    for index in range(args.pairs):
        grpo = describe("grpo", run("grpo", args.steps, work / f"grpo_{index}"))
        mel_rows = run("mel", args.steps, work / f"mel_{index}")
        mel = describe("mel", mel_rows)
        mixed = sum(r["mel/mixed_groups"] > 0 for r in mel_rows)
        if 2 * mixed < len(mel_rows):
            print(f"  note: only {mixed} of {len(mel_rows)} measured MEL steps had a mixed group")
        ratios.append(mel / grpo)
        print(f"pair {index + 1}: step_time mel/grpo={mel / grpo:.2f} "
              f"({mixed}/{len(mel_rows)} MEL steps with mixed groups)", flush=True)  # fmt: skip
    print(f"ratio step_time mel/grpo={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
