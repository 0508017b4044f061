"""The meta-experience store: every candidate M of the run, kept or not, as JSONL.

One line per candidate: step, prompt id, pair, weight version, text, kept, replay answer and
response, parsed failure point and the flags behind the decision. The file is appended (and fsynced) each step;
a checkpoint keeps a copy, and a resumed run restores that copy so records of the interrupted
step do not appear twice. MLflow receives it as an artifact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STORE_NAME = "meta_experiences.jsonl"


@dataclass(frozen=True, slots=True)
class ExperienceRecord:
    step: int
    prompt_id: str
    pair: tuple[int, int]
    """(index of the correct response, index of the incorrect one) in the rollout group."""
    weight_version: int
    text: str
    kept: bool
    reason: str
    """Why it was kept or dropped: kept, truncated, too_long, leak, no_heuristics,
    replay_failed."""
    replay_answer: str | None
    failure_point: str | None
    leaked: bool
    has_heuristics: bool
    num_tokens: int
    all_sections: bool = False
    """All four sections of the instruction were found (mel/sections_rate)."""
    replay_text: str | None = None
    """The replay's response (None if M never reached the replay): why M was kept or not."""


class ExperienceStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / STORE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, records: list[ExperienceRecord]) -> None:
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def save_to(self, checkpoint_dir: str | Path) -> None:
        target = Path(checkpoint_dir) / STORE_NAME
        if self.path.is_file():
            shutil.copy2(self.path, target)
        else:
            target.write_text("")

    def restore_from(self, checkpoint_dir: str | Path) -> None:
        source = Path(checkpoint_dir) / STORE_NAME
        if not source.is_file():
            raise FileNotFoundError(f"{checkpoint_dir} has no {STORE_NAME}")
        shutil.copy2(source, self.path)
