"""Final-answer extraction from math solutions and model completions.

Two conventions are supported:

* MATH / MATH-500: the answer is the content of the *last* ``\\boxed{...}`` (or ``\\fbox{...}``,
  or the brace-less ``\\boxed 5`` form) in the text.
* GSM8K: the answer is the number after the last ``####`` marker.

Both functions are used for gold answers at data-build time and for model completions inside the
reward function, so they never raise on arbitrary input and return ``None`` when no well-formed
answer is present. They are linear in the length of the text.
"""

from __future__ import annotations

import re

__all__ = ["extract_gsm8k_answer", "extract_last_boxed"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_MARKER = "####"
# A number with optional sign, thousands separators and decimals. Requiring a digit after the
# decimal point keeps a sentence-final period ("#### 18.") out of the answer.
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _last_box_command(text: str) -> tuple[int, int] | None:
    """Return ``(start, end)`` of the last box command (end is just past the command name)."""
    best: tuple[int, int] | None = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start != -1:
            end = start + len(command)
            # Skip longer control words that merely start with the command, e.g. "\fboxsep".
            if end >= len(text) or not text[end].isalpha():
                if best is None or start > best[0]:
                    best = (start, end)
                break
            start = text.rfind(command, 0, start)
    return best


def _balanced_group(text: str, open_pos: int) -> str | None:
    """Return the content of the ``{...}`` group opening at ``open_pos``; None if unbalanced.

    A backslash escapes the next character, so the literal braces ``\\{``/``\\}`` (set notation,
    ``\\left\\{``) do not count as grouping.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def extract_last_boxed(text: str) -> str | None:
    """Return the stripped content of the last ``\\boxed``/``\\fbox`` in ``text``.

    Contract:
      * ``\\boxed{...}``: content of the balanced group (nested braces allowed).
      * ``\\boxed 5`` (no brace): the text after the space up to the next ``$`` or newline.
      * Returns None if there is no box command, the last one is unbalanced or not followed by an
        argument, or the content is empty/whitespace. Only the *last* command is considered: an
        earlier well-formed box must not be rewarded when the final one is broken.
    """
    if not text:
        return None
    found = _last_box_command(text)
    if found is None:
        return None
    _, pos = found
    n = len(text)
    if pos < n and text[pos] == "{":
        content = _balanced_group(text, pos)
    elif pos < n and text[pos] == " ":
        # Brace-less form as in the reference MATH grader: argument runs to the math delimiter.
        rest = text[pos:].lstrip(" ")
        if rest.startswith("{"):
            content = _balanced_group(rest, 0)
        else:
            content = re.split(r"[$\n]", rest, maxsplit=1)[0]
    else:
        return None
    if content is None:
        return None
    content = content.strip()
    return content or None


def extract_gsm8k_answer(text: str) -> str | None:
    """Return the number after the last ``####`` in ``text``, with ``,`` and ``$`` removed.

    ``"#### 1,234"`` -> ``"1234"``; ``"#### $18."`` -> ``"18"``. Only the rest of the marker's
    line is searched, so a number in later text is never mistaken for the answer. Returns None
    if there is no marker or no number after it.
    """
    if not text:
        return None
    idx = text.rfind(_GSM8K_MARKER)
    if idx == -1:
        return None
    tail = text[idx + len(_GSM8K_MARKER) :].split("\n", 1)[0]
    match = _NUMBER_RE.search(tail.replace("$", ""))
    if match is None:
        return None
    number = match.group(0).replace(",", "")
    return number or None
