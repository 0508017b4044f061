"""``megatron-mel report``: PNG panels, the overview and the markdown summary of runs, from
metrics.jsonl; runs overlay, missing metrics are absent lines, bad files are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_mel.errors import ConfigError
from megatron_mel.report import PANELS, load_run, log_report, main, summary_markdown, write_report


def _run_dir(root: Path, name: str, *, mel: bool, steps: int = 4) -> Path:
    run = root / name
    run.mkdir()
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "reward/mean": 0.1 * step, "train/pg_loss": -0.01 * step,
                  "train/nll_loss": 0.0, "rollout/response_length": 50.0 + step,
                  "time/rollout": 10.0, "time/train": 20.0, "time/step": 35.0}  # fmt: skip
        if mel:
            record.update({"mel/mixed_groups": 2.0, "mel/pairs": 6.0, "mel/candidates": 4.0,
                           "mel/kept": float(step % 3), "mel/retention": (step % 3) / 4,
                           "mel/me_length": 120.0, "train/nll_loss": 1.5,
                           "time/reflection": 5.0, "time/replay": 3.0})  # fmt: skip
        if step == steps:
            record["eval/gsm8k/pass_at_1"] = 0.25
        lines.append(json.dumps(record))
    # A resumed run re-logs its last step: the later record wins.
    lines.append(json.dumps({**json.loads(lines[-1]), "reward/mean": 0.9}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_two_runs_overlay_into_pngs_and_a_summary(tmp_path):
    mel = load_run(_run_dir(tmp_path, "mel", mel=True))
    grpo = load_run(_run_dir(tmp_path, "grpo", mel=False))
    assert [int(r["step"]) for r in mel.steps] == [1, 2, 3, 4] and mel.last("reward/mean") == 0.9
    files = write_report([mel, grpo], tmp_path / "out")
    names = {p.name for p in files}
    assert names == {p.file for p in PANELS} | {"overview.png", "report.md"}
    for path in files:
        if path.suffix == ".png":
            width, height = _png_size(path)
            assert width > 400 and height > 300
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| | mel | grpo |" in text
    assert "| pairs / candidates / kept (total) | 24 / 16 / 4 | - / - / - |" in text
    assert "| retention (kept / candidates, all steps) | 0.250 (4/16) | - |" in text
    assert "| last eval/gsm8k/pass_at_1 | 0.250 | 0.250 |" in text  # no problem count logged
    assert "![overview](overview.png)" in text


def test_panels_nobody_logged_are_left_out(tmp_path):
    grpo = load_run(_run_dir(tmp_path, "grpo", mel=False))
    names = {p.name for p in write_report([grpo], tmp_path / "out")}
    assert "retention.png" not in names and "reflection.png" not in names
    assert {"reward.png", "loss.png", "seconds.png", "overview.png"} <= names
    assert "retention.png" not in summary_markdown([grpo], [])


def test_bad_run_directories_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no metrics\.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2: not a metrics record"):
        load_run(tmp_path)


def test_cli_and_end_of_run_logging(tmp_path, capsys):
    run = _run_dir(tmp_path, "mel", mel=True)
    assert main([str(run)]) == 0
    assert (run / "report" / "overview.png").is_file()
    assert str(run / "report" / "report.md") in capsys.readouterr().out

    class Recorder:
        def __init__(self):
            self.logged = []

        def log_artifact(self, path, artifact_path=None):
            self.logged.append((Path(path).name, artifact_path))

    tracker = Recorder()
    log_report(tracker, run)
    assert ("overview.png", "report") in tracker.logged and (
        "report.md",
        "report",
    ) in tracker.logged
    assert log_report(tracker, tmp_path / "missing") == []  # warns, never raises
