"""Bad input to the conversion tool: a one-line error naming the problem, exit code 2, and no
worker started."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import run_convert_tool as _run

# Input checks fail in the parent before any worker starts: these calls are quick.
TIMEOUT = 120


def run_convert_tool(*args: str):
    return _run(*args, timeout=TIMEOUT)


def _assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


def test_missing_hf_dir(tmp_path):
    proc = run_convert_tool(
        "hf-to-mcore", "--hf-dir", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "m")
    )
    _assert_one_line_error(proc, r"HF model directory .*absent.* does not exist")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    proc = run_convert_tool(
        "hf-to-mcore", "--hf-dir", str(tmp_path), "--out-dir", str(tmp_path / "m")
    )
    _assert_one_line_error(proc, r"unsupported architecture 'GPT2LMHeadModel' \(supported: ")


def test_tp_not_dividing_heads(tiny_models, tmp_path):
    proc = run_convert_tool(
        "hf-to-mcore", "--hf-dir", str(tiny_models["llama"]), "--out-dir", str(tmp_path / "m"),
        "--tp", "3",
    )  # fmt: skip
    _assert_one_line_error(proc, r"parallel.tp=3 does not divide the 4 attention heads")


@pytest.mark.parametrize("direction", ["mcore-to-hf"])
def test_not_a_megatron_checkpoint(tmp_path, direction):
    proc = run_convert_tool(
        direction, "--mcore-dir", str(tmp_path), "--out-dir", str(tmp_path / "h")
    )
    _assert_one_line_error(proc, r"not a megatron-mel checkpoint")
