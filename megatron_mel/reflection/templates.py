"""The two reflection prompts: the meta-experience instruction I and the replay prompt.

Our own wording, with the structure MEL.md §1.5 and the paper's Appendix C give (see
MEL-paper-notes.md §4): an analyst role; a comparative analysis of a wrong and a right solution
to the same question, the wrong one shown first; four mandatory output sections in a fixed
order (failure point and the defect behind it, what made the correct solution work, a
first-person summary, abstract "If ..., then ..." heuristics without problem-specific numbers);
then the question and both solutions with their verdicts in literal tags. The replay prompt puts
a meta-experience before the question as working memory.

Either template can be replaced by a file (``reflection.experience_template`` /
``reflection.replay_template``); a file must contain the same placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_mel.config import ConfigError

SECTION_TITLES = (
    "Failure Point and Latent Reasoning Defect",
    "Why the Correct Solution Worked",
    "First-Person Reflective Summary",
    "Subject Heuristics",
)

EXPERIENCE_TEMPLATE = f"""You are a meta-cognitive reasoning analyst. You study several solution \
attempts at the same problem, find the structural difference between the thinking that failed \
and the thinking that succeeded, and turn it into principles that transfer to new problems.

The verdicts below only say whether the final answer is right; the reasoning of either attempt \
may still contain detours. Perform a careful comparative autopsy of the two attempts.

What to analyse:
1. The incorrect attempt: locate the bifurcation point, the exact step where a sound start \
turned into an error, and name the latent defect behind it (a conflated concept, a rigid \
strategy, an overlooked edge case or constraint, an intuitive shortcut) and the principle it \
violated. Look past arithmetic slips to why the reasoning drifted.
2. The correct attempt: if it corrected itself, say what triggered the correction and what \
insight made the pivot possible; if it never erred, say which habit (a precise definition, a \
clear representation, step-by-step verification) kept it away from the trap.
3. The contrast: why did one attempt avoid the trap the other fell into?
4. Generalise: the summary and the heuristics must not mention this problem's numbers, \
variables or answer; write conditional rules that would help on other problems of this kind.

Answer with exactly these four sections, in this order:
### 1. {SECTION_TITLES[0]}
Failure point: <the step where the incorrect attempt diverged>
Latent defect: <the reasoning flaw behind it>
### 2. {SECTION_TITLES[1]}
<the pivot or the protective habit, and why it was effective>
### 3. {SECTION_TITLES[2]}
Review: <...> Insight: <...> Action: <...> (written as "I")
### 4. {SECTION_TITLES[3]}
- [Pattern name]: If <abstract condition>, then <abstract action>.
- [Pattern name]: When dealing with <kind of concept>, I must verify <constraint>.

Here are the question and the two solutions.
<question> {{question}} </question>
- Solution 1: <answer> {{incorrect}} </answer> <judge> Incorrect </judge>
- Solution 2: <answer> {{correct}} </answer> <judge> Correct </judge>"""

REPLAY_TEMPLATE = """Earlier study of this question left you the notes below: the approach and \
steps a correct solution needs, the reasoning traps and logical flaws that led to wrong \
solutions, and heuristics for problems of this kind.

{experience}

Treat these notes as your own experience. Think the problem through independently and in \
detail, make full use of the notes, and give a complete answer with the final result within \
\\boxed{{}}.

Answer the following question: {question}"""


@dataclass(frozen=True, slots=True)
class ReflectionTemplates:
    experience: str = EXPERIENCE_TEMPLATE
    replay: str = REPLAY_TEMPLATE

    def __post_init__(self) -> None:
        _check(self.experience, ("question", "incorrect", "correct"), "experience")
        _check(self.replay, ("experience", "question"), "replay")

    @classmethod
    def load(cls, experience_path: str | None, replay_path: str | None) -> ReflectionTemplates:
        return cls(
            experience=_read(experience_path, "reflection.experience_template")
            or EXPERIENCE_TEMPLATE,
            replay=_read(replay_path, "reflection.replay_template") or REPLAY_TEMPLATE,
        )

    def experience_prompt(self, question: str, incorrect: str, correct: str) -> str:
        """The instruction I with C_retro = [x, y-, y+] filled in (wrong solution first)."""
        return self.experience.format(question=question, incorrect=incorrect, correct=correct)

    def replay_prompt(self, experience: str, question: str) -> str:
        return self.replay.format(experience=experience, question=question)


def _read(path: str | None, key: str) -> str | None:
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: template file {path!r} does not exist")
    return file.read_text(encoding="utf-8")


def _check(template: str, names: tuple[str, ...], which: str) -> None:
    for name in names:
        if "{" + name + "}" not in template:
            raise ConfigError(f"the {which} template lacks the placeholder {{{name}}}")
    try:
        template.format(**dict.fromkeys(names, ""))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"the {which} template has a stray placeholder or brace ({exc}); double literal "
            "braces as {{ }}"
        ) from exc
