"""Ranks started by torchrun (no launcher of ours) honour a SIGTERM sent to torchrun: every rank
stops after the same iteration, agreed with lifecycle.agree_to_stop."""

import os
import time

import torch.distributed as dist

from megatron_mel import lifecycle
from megatron_mel.launch import run_workers


def body() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"rank {rank} ready", flush=True)
    iterations = 0
    while (request := lifecycle.agree_to_stop()) is None:
        iterations += 1
        time.sleep(0.05 * (rank + 1))  # the ranks run at different speeds
    print(f"rank {rank} stopped by {request.reason} after {iterations}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_workers(body, int(os.environ["WORLD_SIZE"]), graceful_stop=True)
