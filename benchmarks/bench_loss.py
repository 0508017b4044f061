"""Fused combined loss vs the naive full-logits loss: time and peak memory, forward + backward.

    python benchmarks/bench_loss.py [--configs 8192x576x49152,4096x1024x151936] [--repeats 1]

Each (implementation, shape) runs in its own subprocess so peak memory is measured cleanly:
on CUDA with torch.cuda.max_memory_allocated, on CPU as the growth of the process's peak RSS
over the inputs. Implementations: "naive" (fp32 logits for the whole pack, autograd through
log_softmax), "chunked" (the fused loss with torch kernels), and on CUDA "triton".

The last line is ``ratio peak_mem naive/fused=<x> time fused/naive=<y>``, taking the worst
shape (smallest memory ratio, largest time ratio) and, on CUDA, the faster fused kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_CONFIGS = "8192x576x49152,4096x1024x151936"


def _inputs(tokens: int, hidden: int, vocab: int, device: str, dtype):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.05).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    loss_type = torch.randint(1, 3, (tokens,), generator=gen, dtype=torch.int8).to(device)
    weight = torch.full((tokens,), 1.0 / tokens, device=device)
    adv = torch.randn(tokens, generator=gen).to(device)
    old = torch.full((tokens,), -10.8, device=device)  # ~ log(1 / 49152)
    return h, w, labels, loss_type, weight, adv, old


def _worker(impl: str, tokens: int, hidden: int, vocab: int, repeats: int) -> dict:
    import torch

    from megatron_mel.ops import fused_combined_loss
    from megatron_mel.ops.reference import reference_combined_loss

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    args = _inputs(tokens, hidden, vocab, device, dtype)
    if impl == "naive":
        run = lambda: reference_combined_loss(*args)[0]  # noqa: E731
    else:

        def run():
            return fused_combined_loss(*args, kernels="torch" if impl == "chunked" else "triton")[0]

    def step() -> None:
        loss = run()
        loss.backward()
        args[0].grad = None
        args[1].grad = None

    if cuda:
        step()  # warm-up: Triton compilation and cuBLAS heuristics
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time_s": min(times), "peak_mb": peak / 2**20, "device": device, "dtype": str(dtype)}


def _run(impl: str, shape: tuple[int, int, int], repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "x".join(map(str, shape)), str(repeats)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {shape} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="TxHxV[,TxHxV...]")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, shape, repeats = args.worker
        t, h, v = map(int, shape.split("x"))
        print(json.dumps(_worker(impl, t, h, v, int(repeats))))
        return

    import torch

    impls = ["naive", "chunked"] + (["triton"] if torch.cuda.is_available() else [])
    worst_mem, worst_time = float("inf"), 0.0
    for spec in args.configs.split(","):
        shape = tuple(int(x) for x in spec.split("x"))
        results = {impl: _run(impl, shape, args.repeats) for impl in impls}
        naive = results["naive"]
        fused_name = min((i for i in impls if i != "naive"), key=lambda i: results[i]["time_s"])
        for impl, r in results.items():
            print(f"T={shape[0]} H={shape[1]} V={shape[2]} {impl:8s} {r['device']} {r['dtype']}: "
                  f"time {r['time_s']:.3f} s  peak mem {r['peak_mb']:.0f} MiB", flush=True)  # fmt: skip
        fused = results[fused_name]
        mem_ratio = naive["peak_mb"] / max(fused["peak_mb"], 1.0)
        time_ratio = fused["time_s"] / naive["time_s"]
        print(f"T={shape[0]} H={shape[1]} V={shape[2]}: peak_mem naive/{fused_name}="
              f"{mem_ratio:.2f} time {fused_name}/naive={time_ratio:.2f}", flush=True)  # fmt: skip
        worst_mem, worst_time = min(worst_mem, mem_ratio), max(worst_time, time_ratio)
    print(f"ratio peak_mem naive/fused={worst_mem:.2f} time fused/naive={worst_time:.2f}")


if __name__ == "__main__":
    main()
