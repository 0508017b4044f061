"""Vocabulary-parallel fused loss on 2 gloo ranks equals the unsharded naive reference, for the
chunked torch kernels and for the Triton kernels (interpreter)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_torchrun
from tests.parallel.workers.fused_tp import TP_CASES


@pytest.fixture(scope="module", params=["torch", "triton"])
def tp_errors(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_tp") / "errors.json"
    env = {"TRITON_INTERPRET": "1"} if request.param == "triton" else {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run_torchrun("fused_tp.py", 2, str(out), request.param)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return request.param, json.loads(out.read_text())


@pytest.mark.parametrize("case", TP_CASES)
def test_tp2_matches_reference(tp_errors, case):
    _, errors = tp_errors
    tolerance = 2e-2 if case == "bf16" else 1e-5
    assert max(errors[case].values()) <= tolerance, errors[case]
