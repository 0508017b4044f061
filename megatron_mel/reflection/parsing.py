"""Reading a generated meta-experience: sections, failure point, answer leaks.

Parsing is for metrics and optional filters only; training always uses the whole generated text
(MEL.md: M is the whole generation). Section detection is lenient: a heading is any line that
names a section title (with or without "###" or its number), case-insensitive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_mel.reflection.templates import SECTION_TITLES

_KEYS = ("failure", "success", "summary", "heuristics")
_FAILURE_POINT = re.compile(r"failure point\s*[:：]\s*(.+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ParsedExperience:
    sections: dict[str, str]
    """Section key (failure / success / summary / heuristics) -> its text, for those found."""
    failure_point: str | None

    @property
    def has_heuristics(self) -> bool:
        return bool(self.sections.get("heuristics", "").strip())

    @property
    def complete(self) -> bool:
        return all(self.sections.get(k, "").strip() for k in _KEYS)


def _heading_key(line: str) -> str | None:
    text = line.strip().lstrip("#").strip().lower()
    text = re.sub(r"^\d+[.)]\s*", "", text)
    for key, title in zip(_KEYS, SECTION_TITLES):
        if text.startswith(title.lower()) or (key == "heuristics" and "heuristic" in text[:40]):
            return key
    return None


def parse_experience(text: str) -> ParsedExperience:
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        key = _heading_key(line) if len(line) < 200 else None
        if key is not None:
            current = key
            sections.setdefault(key, [])
            continue
        if current is not None:
            sections[current].append(line)
    joined = {k: "\n".join(v).strip() for k, v in sections.items()}
    match = _FAILURE_POINT.search(joined.get("failure", "") or text)
    return ParsedExperience(joined, match.group(1).strip()[:500] if match else None)


def leaks_answer(text: str, answer: str) -> bool:
    """Whether ``text`` contains the gold answer string (numbers matched as whole numbers)."""
    gold = answer.strip()
    if not gold:
        return False
    if re.fullmatch(r"-?\d+(\.\d+)?", gold):
        return re.search(rf"(?<![\d.]){re.escape(gold)}(?![\d]|\.\d)", text) is not None
    return gold in text
