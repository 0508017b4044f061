"""On a GPU with Transformer Engine: the TE layer spec gives transformers' logits (bf16 and fp32),
including THD packs through TE attention. Skipped without CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
        reason="needs CUDA and transformer-engine",
    ),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_te_spec_matches_transformers(tiny_models, family, dtype):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mel.cli", "parity", "--hf-dir", str(tiny_models[family]),
         "--dtype", dtype],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "attention=te" in proc.stdout and "OK" in proc.stdout
