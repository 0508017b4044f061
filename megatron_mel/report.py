"""Plots and a markdown summary of one or several training runs, from their ``metrics.jsonl``.

    megatron-mel report RUN_DIR [RUN_DIR ...] [--out DIR] [--names A,B]

One PNG per panel, every run overlaid in its own colour (MEL vs GRPO on the same axes), plus
``overview.png`` with all panels on one page and ``report.md`` with a per-run table and the
images. Panels (the MEL.md §3 metrics a run is judged by):

    reward        reward/mean (and eval Pass@1 where evaluated)
    groups        mel/mixed_groups: prompts whose group has a right and a wrong answer
    reflection    mel/pairs, mel/candidates, mel/kept per step
    retention     mel/retention = kept / candidates
    loss          train/pg_loss and train/nll_loss
    length        rollout/response_length (mean generated tokens) and mel/me_length
    seconds       time/<phase> per step (rollout, reward, reflection, replay, logprobs, train, sync)

A run without a metric (GRPO logs no mel/*) simply has no line there; a panel no run logged says
so. The trainer calls :func:`log_report` when a run ends, so MLflow holds the same files under
``report/``. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mel.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    path: Path
    steps: list[dict[str, float]]
    """One record per logged step, ascending (a resumed run's re-logged steps: the last wins)."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(int(r["step"]), float(r[key])) for r in self.steps if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def has(self, key: str) -> bool:
        return any(key in r for r in self.steps)

    def mean(self, key: str) -> float | None:
        _, values = self.series(key)
        return sum(values) / len(values) if values else None

    def total(self, key: str) -> float | None:
        _, values = self.series(key)
        return sum(values) if values else None

    def last(self, key: str) -> float | None:
        _, values = self.series(key)
        return values[-1] if values else None


@dataclass(frozen=True, slots=True)
class Panel:
    file: str
    title: str
    keys: tuple[tuple[str, str], ...]
    """(metric key, legend label) of each series; a ``*`` in a key matches one path part
    (every benchmark's ``eval/<name>/pass_at_1``), ``{}`` in its label becomes that part."""
    ylabel: str
    series_colors: bool = False
    """Colour by series (and line style by run) even with several runs: for panels with many
    series, where style alone would repeat."""

    def expand(self, runs: Sequence[Run]) -> tuple[tuple[str, str], ...]:
        out = []
        for key, label in self.keys:
            if "*" not in key:
                out.append((key, label))
                continue
            head, tail = key.split("*")
            found = sorted({k for run in runs for rec in run.steps for k in rec
                            if k.startswith(head) and k.endswith(tail) and
                            "/" not in k[len(head) : len(k) - len(tail)]})  # fmt: skip
            out += [(k, label.format(k[len(head) : len(k) - len(tail)])) for k in found]
        return tuple(out)


PHASES = ("rollout", "reward", "reflection", "replay", "logprobs", "reference", "train", "sync")
PANELS = (
    Panel("reward.png", "Reward", (("reward/mean", "train reward"),
                                   ("eval/*/pass_at_1", "eval {} Pass@1")), "reward"),
    Panel("groups.png", "Mixed groups", (("mel/mixed_groups", "mixed groups"),), "prompts"),
    Panel("reflection.png", "Reflection", (("mel/pairs", "pairs"), ("mel/candidates", "candidates"),
                                           ("mel/kept", "kept")), "per step"),
    Panel("retention.png", "Retention (kept / candidates)", (("mel/retention", "retention"),),
          "fraction"),
    Panel("loss.png", "Loss terms", (("train/pg_loss", "PG loss"), ("train/nll_loss", "NLL loss")),
          "loss"),
    Panel("length.png", "Lengths", (("rollout/response_length", "response"),
                                    ("mel/me_length", "meta-experience")), "tokens"),
    Panel("seconds.png", "Seconds per phase", tuple((f"time/{p}", p) for p in PHASES), "seconds",
          series_colors=True),
)  # fmt: skip
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def load_run(path: str | Path, name: str | None = None) -> Run:
    """The run in ``path`` (its metrics.jsonl); ConfigError naming the file and line if bad."""
    root = Path(path)
    metrics = root / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{root}: no metrics.jsonl (not a training run directory?)")
    by_step: dict[int, dict[str, float]] = {}
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{metrics}:{number}: not a metrics record ({exc})") from exc
        by_step[step] = record
    if not by_step:
        raise ConfigError(f"{metrics}: no steps logged yet")
    return Run(name or root.name, root, [by_step[s] for s in sorted(by_step)])


def _axes_panel(ax: Any, panel: Panel, runs: Sequence[Run], colors: list[Any]) -> bool:
    """Draw ``panel`` on ``ax``; False when no run logged any of its series."""
    drawn = False
    keys = panel.expand(runs)
    multi_series = len(keys) > 1
    for r, run in enumerate(runs):
        for s, (key, label) in enumerate(keys):
            steps, values = run.series(key)
            if not steps:
                continue
            # One run: colour tells series apart. Several: colour is the run and line style the
            # series, unless the panel has too many series for styles (then the reverse).
            by_series = len(runs) == 1 or panel.series_colors
            color = colors[(s if by_series else r) % len(colors)]
            style = LINE_STYLES[(r if by_series else s) % len(LINE_STYLES)]
            legend = label if len(runs) == 1 else (
                f"{run.name}: {label}" if multi_series else run.name
            )  # fmt: skip
            marker = MARKERS[r % len(MARKERS)] if len(steps) <= 30 else None
            ax.plot(steps, values, style, color=color, marker=marker, markersize=3.5,
                    alpha=0.85, label=legend)  # fmt: skip
            drawn = True
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, framealpha=0.6, ncol=2 if len(panel.keys) > 4 else 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        names = ", ".join(k for k, _ in panel.keys[:3])
        ax.text(0.5, 0.5, f"not logged by these runs\n({names})", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="gray")  # fmt: skip
    return drawn


def write_report(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write every panel PNG, overview.png and report.md into ``out_dir``; return the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = list(plt.get_cmap("tab10").colors)
    written, drawn_panels = [], []
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        if _axes_panel(ax, panel, runs, colors):
            fig.tight_layout()
            fig.savefig(out / panel.file)
            written.append(out / panel.file)
            drawn_panels.append(panel)
        plt.close(fig)
    cols = 3
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), dpi=90)
    flat = list(axes.flat)
    for ax, panel in zip(flat, PANELS):
        _axes_panel(ax, panel, runs, colors)
    for ax in flat[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(" vs ".join(run.name for run in runs))
    fig.tight_layout()
    fig.savefig(out / "overview.png")
    plt.close(fig)
    written.append(out / "overview.png")
    markdown = out / "report.md"
    markdown.write_text(summary_markdown(runs, drawn_panels), encoding="utf-8")
    written.append(markdown)
    return written


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_markdown(runs: Sequence[Run], panels: Sequence[Panel] = PANELS) -> str:
    """A per-run table of the MEL.md §3 metrics, the last evaluation, and the images."""
    lines = [f"# Report: {' vs '.join(run.name for run in runs)}", ""]
    lines += ["| | " + " | ".join(run.name for run in runs) + " |",
              "|---|" + "---|" * len(runs)]  # fmt: skip
    rows: list[tuple[str, Any]] = [
        ("run directory", lambda r: f"`{r.path}`"),
        ("steps logged", lambda r: f"{len(r.steps)} (last {int(r.steps[-1]['step'])})"),
        ("reward, first step", lambda r: _fmt(r.series("reward/mean")[1][0]
                                              if r.has("reward/mean") else None)),
        ("reward, last step", lambda r: _fmt(r.last("reward/mean"))),
        ("reward, mean", lambda r: _fmt(r.mean("reward/mean"))),
        ("mixed groups per step", lambda r: _fmt(r.mean("mel/mixed_groups"), 2)),
        ("pairs / candidates / kept (total)",
         lambda r: " / ".join(_fmt(r.total(k), 0) for k in ("mel/pairs", "mel/candidates",
                                                            "mel/kept"))),
        ("retention (kept / candidates, all steps)", _retention),
        ("PG loss, mean", lambda r: _fmt(r.mean("train/pg_loss"), 4)),
        ("NLL loss, mean", lambda r: _fmt(r.mean("train/nll_loss"), 4)),
        ("response length, mean", lambda r: _fmt(r.mean("rollout/response_length"), 1)),
        ("meta-experience length, mean", lambda r: _fmt(r.mean("mel/me_length"), 1)),
        ("seconds per step, mean", lambda r: _fmt(r.mean("time/step"), 1)),
    ]  # fmt: skip
    for phase in PHASES:
        if any(run.has(f"time/{phase}") for run in runs):
            rows.append((f"  {phase} s", lambda r, p=phase: _fmt(r.mean(f"time/{p}"), 1)))
    evals = sorted({k for run in runs for rec in run.steps for k in rec
                    if k.startswith("eval/") and not k.endswith("/problems")})  # fmt: skip
    for key in evals:
        count = key.rsplit("/", 1)[0] + "/problems"
        rows.append((f"last {key}", lambda r, k=key, c=count: _fmt(r.last(k))
                     + (f" (of {r.last(c):.0f})" if r.last(c) is not None else "")))  # fmt: skip
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(run) for run in runs) + " |")
    lines += ["", "![overview](overview.png)", ""]
    lines += [f"![{panel.title}]({panel.file})" for panel in panels]
    return "\n".join(lines) + "\n"


def _retention(run: Run) -> str:
    kept, candidates = run.total("mel/kept"), run.total("mel/candidates")
    if kept is None or not candidates:
        return "-"
    return f"{kept / candidates:.3f} ({kept:.0f}/{candidates:.0f})"


def log_report(tracker: Any, run_dir: str | Path) -> list[Path]:
    """Write ``run_dir``/report for this run and log its files to ``tracker`` under report/.

    Called by the trainer on the driver when a run ends; a failure here is logged, never raised
    (it must not mask how the run itself ended).
    """
    try:
        files = write_report([load_run(run_dir)], Path(run_dir) / "report")
    except Exception as exc:  # a report is a by-product: warn, do not fail the run
        log.warning("no report for %s: %s: %s", run_dir, type(exc).__name__, exc)
        return []
    for path in files:
        tracker.log_artifact(path, "report")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-mel report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: RUN_DIR/report for one run, runs/report-A-vs-B for several")  # fmt: skip
    parser.add_argument("--names", default=None, help="comma-separated legend names")
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else [None] * len(args.runs)
    if len(names) != len(args.runs):
        raise ConfigError(f"--names: {len(names)} names for {len(args.runs)} runs")
    runs = [load_run(path, name) for path, name in zip(args.runs, names)]
    out = args.out or (
        runs[0].path / "report"
        if len(runs) == 1
        else Path("runs") / ("report-" + "-vs-".join(run.name for run in runs))
    )
    for path in write_report(runs, out):
        print(path)
    return 0
