"""Rollout log-probs of the embedded engine equal the trainer's on SmolLM2 (fp32), both from a
no-grad forward and from the training forward the loop takes pi_old from."""

from __future__ import annotations

import json

from tests.conftest import run_torchrun


def test_embedded_engine_logprobs_match_trainer(assets, tmp_path):
    out = tmp_path / "mismatch.json"
    run_torchrun("logprob_consistency.py", 1, str(out), str(assets.model_dir))
    metrics = json.loads(out.read_text())
    assert metrics["tokens"] >= 100
    assert metrics["rollout/train_logprob_abs_diff"] <= 1e-4, metrics
    assert metrics["train_forward/rollout/train_logprob_abs_diff"] <= 1e-4, metrics
    assert metrics["train_vs_no_grad_max_diff"] <= 1e-5, metrics
