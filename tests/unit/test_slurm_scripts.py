"""Every shell script of the project parses (``bash -n``) and passes shellcheck; every sbatch
script goes through the one launcher, is requeue-safe, and its recipe fits its allocation."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mel.cli import main
from tests.conftest import REPO

SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("tools/*.sh"), *REPO.glob("tests/gpu/*.sh")])
JOBS = sorted(REPO.glob("slurm/mel_*.sh"))


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).is_file():
        pytest.fail("shellcheck is missing: it is a dev dependency (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_passes_on_every_script():
    proc = subprocess.run([_shellcheck(), "--severity=info", *map(str, SCRIPTS)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _directives(script: Path) -> dict[str, str]:
    found = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line)
        if m:
            found[m.group(1)] = m.group(2) or ""
    return found


@pytest.mark.parametrize("script", JOBS, ids=lambda p: p.name)
def test_job_script_uses_the_launcher_and_is_requeue_safe(script):
    text = script.read_text()
    directives = _directives(script)
    assert "requeue" in directives and directives["signal"].startswith("B:USR1@")
    (recipe,) = re.findall(r"slurm/launch\.sh\" (examples/\S+\.yaml)", text)
    assert (REPO / recipe).is_file()


@pytest.mark.parametrize("script", [j for j in JOBS if "gpus-per-node" in _directives(j)],
                         ids=lambda p: p.name)  # fmt: skip
def test_gpu_job_recipe_fits_its_allocation_on_80gb(script, capsys):
    d = _directives(script)
    (recipe,) = re.findall(r"slurm/launch\.sh\" (examples/\S+\.yaml)", script.read_text())
    code = main(["plan", str(REPO / recipe), "--nodes", d["nodes"], "--gpus-per-node",
                 d["gpus-per-node"], "--gpu-mem-gib", "80"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
