"""After an optimizer step on gloo (TP=2, and TP=2 x PP=2), the embedded engine's weights equal
the converter's HF export of the saved checkpoint bit for bit; a corrupted transfer stops
training on every rank."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_torchrun


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (2, 2)], ids=["tp2", "tp2-pp2"])
def test_engine_weights_equal_converter_export(tiny_models, tmp_path, tp, pp):
    out = tmp_path
    stdout = run_torchrun(
        "weight_sync.py", tp * pp, str(out), str(tiny_models["qwen2"]), str(tp), str(pp)
    )
    assert "sync metrics:" in stdout
    export = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "mcore-to-hf",
         "--mcore-dir", str(out / "mcore"), "--out-dir", str(out / "hf")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    hf = {}
    for file in sorted((out / "hf").glob("*.safetensors")):
        hf.update(load_file(file))
    engine = torch.load(out / "engine.pt")
    original = load_file(tiny_models["qwen2"] / "model.safetensors")
    assert sorted(engine) == sorted(hf)
    changed = 0
    for name, tensor in hf.items():
        assert torch.equal(engine[name], tensor), name
        changed += not torch.equal(tensor, original[name])
    assert changed > len(hf) // 2  # the optimizer step really moved the weights
    report = json.loads((out / "metrics.json").read_text())
    assert report["sync"]["sync/bytes"] == sum(t.numel() * t.element_size() for t in hf.values())
    assert report["sync"]["sync/weight_version"] == 1 and report["sync"]["sync/gb_per_s"] > 0
    for outcome in report["corrupted"]:
        assert "engine weights differ from the trainer's HF export for 1 tensors" in outcome
