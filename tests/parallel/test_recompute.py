"""``model.recompute_activations: true`` trains on CPU, and recomputation changes no gradient.

megatron-core's activation checkpointing saves and restores the CUDA RNG state around every
recomputed layer; on a CPU-only torch the platform shims route that to the CPU generator
(platform.py). The worker builds the policy with and without recomputation from the same weights
and compares the gradients of one global batch, then takes an optimizer step with it on.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_torchrun


@pytest.mark.parametrize("tp", [1, 2])
def test_recompute_gives_the_same_gradients_and_trains(tiny_models, tmp_path, tp):
    run_torchrun("recompute.py", tp, str(tmp_path), str(tiny_models["llama"]), str(tp))
    result = json.loads((tmp_path / f"recompute-tp{tp}.json").read_text())
    plain, recomputed = result["loss"]
    assert recomputed == pytest.approx(plain, rel=1e-7)
    assert result["all_grads_nonzero"]
    # The same ops on the same inputs: recomputation reproduces the activations exactly.
    assert result["max_rel_grad_diff"] <= 1e-7
    step = result["step"]
    assert math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    assert step["lr"] == pytest.approx(1e-3)
    assert result["grads_released_between_steps"] and result["grads_restored"]
    assert math.isfinite(result["second_loss"])
