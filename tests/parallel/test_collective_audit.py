"""No tensor handed to a collective is placed outside the one platform rule: every collective of
a TP2 x PP2 x DP2 gloo step (log-probs, train step, weight sync) is recorded with its tensors'
devices; the ones megatron_mel makes must come from (or be checked by) the rule, and every
tensor must sit on the device the rule names for its group. A probe that builds a plain CPU
tensor from a megatron_mel module shows the audit catches the NCCL-breaking pattern."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_torchrun

pytestmark = pytest.mark.slow
# Sites that must show up: if a refactor moves them, the audit should still see them.
EXPECTED_SITES = (
    "megatron_mel/trainer/actor.py",
    "megatron_mel/algorithms/aggregation.py",
    "megatron_mel/ops/fused_loss.py",
    "megatron_mel/convert/checkpoint.py",
    "megatron_mel/rollout/weight_sync.py",
    "megatron_mel/rollout/sglang_sync.py",
)


def test_every_collective_follows_the_device_rule(tiny_models, tmp_path):
    run_torchrun("collective_audit.py", 8, str(tmp_path), str(tiny_models["qwen2"]))
    reports = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(8)]
    ours = [
        rec for rep in reports for rec in rep["records"] if rec["module"].startswith("megatron_mel")
    ]
    theirs = [
        rec for rep in reports for rec in rep["records"] if rec["module"].startswith("megatron.")
    ]
    assert ours and theirs
    for rec in ours + theirs:
        assert all(d == rec["rule_device"] for d in rec["devices"]), rec
    for rec in ours:
        assert rec["devices"] and all(rec["rule_tensors"]), rec
    seen = {rec["site"].split(":")[0] for rec in ours}
    for site in EXPECTED_SITES:
        assert any(s.endswith(site) for s in seen), (site, sorted(seen))
    for rep in reports:
        (probe,) = rep["probe"]
        assert probe["module"] == "megatron_mel.probe" and probe["rule_tensors"] == [False]
