"""The checkpointer's walltime guard: the job's end time (from Slurm) and the walltime counted
from the trainer's start; the earlier one wins."""

from __future__ import annotations

import time

from megatron_mel.checkpoint import Checkpointer
from megatron_mel.config import CheckpointConfig


def _ckpt(tmp_path, **cfg) -> Checkpointer:
    return Checkpointer(CheckpointConfig(**cfg), tmp_path, num_steps=10, model_meta={}, hf_dir="")


def test_no_limit_never_runs_out(tmp_path):
    ckpt = _ckpt(tmp_path)
    assert ckpt.deadline is None and not ckpt.out_of_time(1e9)


def test_job_end_time_is_absolute(tmp_path):
    # 100 s left: a 10 s step needs 1.5 x 10 + 30 s of margin (no save yet) -> fits; 50 s not.
    ckpt = _ckpt(tmp_path, job_end_time=time.time() + 100)
    assert not ckpt.out_of_time(10.0)
    assert ckpt.out_of_time(50.0)
    assert ckpt.due(3, 50.0)  # saves after this step, out of its interval
    ckpt.last_save_s = 30.0  # a slow save counts twice
    assert ckpt.out_of_time(10.0)


def test_the_earlier_limit_wins(tmp_path):
    late, soon = time.time() + 3600, 1.0  # minutes
    ckpt = _ckpt(tmp_path, job_end_time=late, walltime_minutes=soon)
    assert abs(ckpt.deadline - (ckpt.started + 60)) < 1
    ckpt = _ckpt(tmp_path, job_end_time=time.time() + 10, walltime_minutes=60)
    assert ckpt.deadline < ckpt.started + 11
