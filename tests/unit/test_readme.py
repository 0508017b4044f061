"""The README's commands exist and the cheap ones run (STYLE: README code runs in a test)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_documented_commands_exist():
    from megatron_mel.cli import COMMANDS

    for command in set(re.findall(r"megatron-mel (\w+)", README)):
        assert command in COMMANDS, command
    for path in re.findall(r"(?:tools|slurm|examples|benchmarks)/[\w./]+\.(?:py|sh|yaml)", README):
        assert (REPO / path).is_file(), path
    assert "make demo" in README and "make test" in README


def test_config_command_from_the_readme_runs():
    line = next(x.strip() for x in README.splitlines() if "megatron-mel config examples" in x)
    args = line.split("#")[0].split()[1:]
    proc = subprocess.run([sys.executable, "-m", "megatron_mel.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tp: 4" in proc.stdout
