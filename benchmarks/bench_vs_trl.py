"""megatron-mel vs TRL's GRPOTrainer on one fixed CPU workload: step time and peak memory.

    python benchmarks/bench_vs_trl.py [--pairs 3] [--work-dir runs/bench_vs_trl]

The workload (benchmarks/workload.py): SmolLM2-135M-Instruct in fp32 (the offline asset), the
first 8 GSM8K test questions in file order, 4 prompts per step through the chat template with
the user message ``question + " Put the final answer after ####."``, G = 4 completions of at
most 128 new tokens, temperature 1.0, top_p 1, no top_k, reward 1.0 when the completion's last
number equals the gold number, lr 1e-6 constant AdamW, gradient clip 1.0, no KL, one optimizer
step per step, 1 warm-up + 3 measured steps, seed 0.

* TRL 1.16 runs at its defaults otherwise (benchmarks/trl_grpo_worker.py: gradient
  checkpointing on, ``loss_type="dapo"``, fp32 set explicitly). It is a benchmark dependency
  only: this script makes its own virtual environment (``--trl-venv``) with ``trl==1.16.0`` and
  torch held at the installed CPU build, if it is not there yet.
* megatron-mel runs ``megatron-mel train`` on a recipe written from the same workload (GRPO,
  token-mean aggregation like TRL's dapo loss, activation recomputation like TRL's gradient
  checkpointing, no weight decay like TRL's AdamW default, truncated completions scored like
  TRL scores them, one reward worker, no evaluation).

Runs alternate, one process at a time: TRL, ours, TRL, ours, ... (``--pairs`` pairs). Per run:
the median wall time of the measured steps, its generation / training split, completion
tokens per second, and the peak RSS of the whole process tree (psutil, every 50 ms, summed over
the process and all its descendants). The last line is

    ratio step_time trl/megatron_mel=<x> peak_rss trl/megatron_mel=<y>

with x and y the medians over the pairs of the per-pair ratios. Run it under the shared lock
(``flock -x /tmp/mel-heavy.lock``): the figures are timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

TRL_REQUIREMENTS = ("trl==1.16.0",)


def ensure_trl_venv(venv: Path) -> Path:
    """The python of a venv holding TRL 1.16 and this machine's torch build; made if missing."""
    import torch

    python = venv / "bin" / "python"
    stamp = venv / ".bench-trl-installed"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    wanted = " ".join((torch_pin, *TRL_REQUIREMENTS))
    if stamp.is_file() and stamp.read_text() == wanted:
        return python
    print(f"installing {wanted} into {venv} (once)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch is pinned in the same resolve, so pip keeps the installed CPU build instead of
    # pulling a CUDA one as TRL's dependency.
    subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, *TRL_REQUIREMENTS],
                   check=True)  # fmt: skip
    stamp.write_text(wanted)
    return python


def ours_recipe(model_dir: str, data_path: Path, run_dir: Path) -> dict:
    """The megatron-mel recipe of the workload (see the module docstring for each choice)."""
    return {
        "model": {"hf_dir": model_dir, "dtype": "float32", "max_seq_len": 2048,
                  "recompute_activations": True},
        "data": {"train_path": str(data_path), "prompt_template": "{question}" + workload.USER_SUFFIX,
                 "shuffle": False},
        "rollout": {"engine": "embedded", "prompts_per_step": workload.PROMPTS_PER_STEP,
                    "samples_per_prompt": workload.GROUP_SIZE, "temperature": 1.0, "top_p": 1.0,
                    "top_k": -1, "max_new_tokens": workload.MAX_NEW_TOKENS},
        "algorithm": {"name": "grpo", "loss_agg": "token-mean", "kl_coef": 0.0},
        "reward": {"function": "workload:last_number_reward", "score_truncated": True,
                   "num_workers": 1},
        "optim": {"lr": workload.LEARNING_RATE, "lr_schedule": "constant", "weight_decay": 0.0,
                  "clip_grad": workload.CLIP_GRAD},
        "checkpoint": {"save_every": 10_000},
        "tracking": {"backend": "console"},
        "trainer": {"num_steps": workload.WARMUP_STEPS + workload.MEASURED_STEPS, "eval_every": 0},
        "launch": {"run_dir": str(run_dir), "seed": workload.SEED},
    }  # fmt: skip


class TreeSampler:
    """Peak RSS of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):  # it may have just exited
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``cmd`` to completion (output to ``log``); return the peak RSS of its process tree."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeSampler(proc.pid)
        code = proc.wait()
        peak = sampler.stop()
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exited with {code}; log {log}:\n{tail}")
    return peak


def run_trl(python: Path, model_dir: str, data: Path, work: Path, index: int) -> dict:
    out = work / f"trl_{index}.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(HERE / "trl_grpo_worker.py"), model_dir, str(data), str(out)]
    peak = run_measured(cmd, env, work / f"trl_{index}.log")
    result = json.loads(out.read_text())
    steps = result["steps"][workload.WARMUP_STEPS :]
    return _summary("trl", steps, peak, result["versions"])


def run_ours(model_dir: str, data: Path, work: Path, index: int) -> dict:
    import yaml

    run_dir = work / f"ours_{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = work / "ours.yaml"
    recipe.write_text(yaml.safe_dump(ours_recipe(model_dir, data, run_dir), sort_keys=False))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    megatron_mel = Path(sys.executable).parent / "megatron-mel"
    peak = run_measured([str(megatron_mel), "train", str(recipe)], env, work / f"ours_{index}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {
            "step_s": r["time/step"],
            "generation_s": r.get("time/rollout", 0.0) + r.get("time/reward", 0.0),
            "training_s": r.get("time/logprobs", 0.0) + r.get("time/train", 0.0),
            "sync_s": r.get("time/sync", 0.0),
            "tokens": r["tokens/rollout"],
        }
        for r in rows[workload.WARMUP_STEPS :]
    ]
    import torch

    versions = {"megatron_mel": "this checkout", "torch": torch.__version__,
                "threads": torch.get_num_threads()}  # fmt: skip
    return _summary("megatron_mel", steps, peak, versions)


def _summary(name: str, steps: list[dict], peak: int, versions: dict) -> dict:
    if len(steps) != workload.MEASURED_STEPS:
        raise SystemExit(f"error: {name} logged {len(steps)} measured steps, expected "
                         f"{workload.MEASURED_STEPS}")  # fmt: skip
    median = statistics.median(s["step_s"] for s in steps)
    gen = statistics.median(s["generation_s"] for s in steps)
    train = statistics.median(s["training_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    gen_total = sum(s["generation_s"] for s in steps)
    return {
        "name": name,
        "step_s": median,
        "generation_s": gen,
        "training_s": train,
        "tokens_per_step": tokens / len(steps),
        "gen_tokens_per_s": tokens / gen_total if gen_total else 0.0,
        "step_tokens_per_s": tokens / sum(s["step_s"] for s in steps),
        "peak_rss_gib": peak / 2**30,
        "steps": steps,
        "versions": versions,
    }


def _line(r: dict) -> str:
    return (
        f"{r['name']:>12}: step {r['step_s']:6.1f} s (median of {workload.MEASURED_STEPS}; "
        f"generation {r['generation_s']:5.1f} s, training {r['training_s']:5.1f} s) | "
        f"{r['tokens_per_step']:6.0f} completion tokens/step, {r['gen_tokens_per_s']:5.1f} tok/s "
        f"generating, {r['step_tokens_per_s']:5.1f} tok/s per step | peak RSS "
        f"{r['peak_rss_gib']:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_vs_trl")
    parser.add_argument("--trl-venv", type=Path, default=REPO / ".venv-bench-trl")
    args = parser.parse_args()

    from megatron_mel.assets import prepare_assets

    assets = prepare_assets()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "gsm8k_first8.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for record in workload.first_questions(assets.data["gsm8k_test"]):
            handle.write(json.dumps(record) + "\n")
    python = ensure_trl_venv(args.trl_venv)
    model_dir = str(assets.model_dir)
    print(f"workload: {model_dir} fp32, {data} ({workload.NUM_QUESTIONS} questions), "
          f"{workload.PROMPTS_PER_STEP} prompts x G={workload.GROUP_SIZE} x <= "
          f"{workload.MAX_NEW_TOKENS} tokens, {workload.WARMUP_STEPS} warm-up + "
          f"{workload.MEASURED_STEPS} measured steps; {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)  # fmt: skip
    pairs = []
    for index in range(args.pairs):
        trl = run_trl(python, model_dir, data, work, index)
        print(_line(trl), flush=True)
        ours = run_ours(model_dir, data, work, index)
        print(_line(ours), flush=True)
        pairs.append((trl, ours))
        print(f"pair {index + 1}: step_time trl/megatron_mel={trl['step_s'] / ours['step_s']:.2f} "
              f"peak_rss trl/megatron_mel={trl['peak_rss_gib'] / ours['peak_rss_gib']:.2f} | per "
              f"completion token "
              f"{(trl['step_s'] / trl['tokens_per_step']) / (ours['step_s'] / ours['tokens_per_step']):.2f}",
              flush=True)  # fmt: skip
    (work / "results.json").write_text(json.dumps(pairs, indent=1))
    print(f"versions: trl side {pairs[0][0]['versions']}; ours {pairs[0][1]['versions']}")
    x = statistics.median(t["step_s"] / o["step_s"] for t, o in pairs)
    y = statistics.median(t["peak_rss_gib"] / o["peak_rss_gib"] for t, o in pairs)
    print(f"ratio step_time trl/megatron_mel={x:.2f} peak_rss trl/megatron_mel={y:.2f}")


if __name__ == "__main__":
    main()
