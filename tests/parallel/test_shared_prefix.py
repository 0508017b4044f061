"""Shared-prefix packing (the prompt once, each response continuing it) trains exactly like
packing every sample whole: same loss, gradients and target log-probs, fewer tokens; under
data parallelism (units stay on one rank) and pipeline parallelism (RoPE positions on every
stage)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_torchrun


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (1, 2)], ids=["dp2", "pp2"])
def test_shared_prefixes_change_nothing_but_the_token_count(tiny_models, tmp_path, tp, pp):
    run_torchrun("shared_prefix.py", 2, str(tmp_path), str(tiny_models["llama"]), str(tp), str(pp))
    result = json.loads((tmp_path / f"shared-tp{tp}-pp{pp}.json").read_text())
    plain, shared = result["loss"]
    assert shared == pytest.approx(plain, rel=1e-6)
    assert result["nll_loss"][1] == pytest.approx(result["nll_loss"][0], rel=1e-6)
    assert result["max_rel_grad_diff"] <= 1e-5
    assert result["lengths_match"] and result["max_logprob_diff"] <= 1e-5
    # 2 prompts of 5 and 8 tokens, 4 responses each: (5 - 1) * 3 + (8 - 1) * 3 = 33 fewer;
    # 3 meta-experience contexts with a common 12-token head: 2 * 12 fewer.
    assert result["tokens"] == [155 + 36, 155 + 36 - 33 - 24]
