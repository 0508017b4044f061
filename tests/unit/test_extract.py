"""Edge cases of the answer extractors used for gold answers and for rewards."""

import pytest

from megatron_mel.rewards.extract import extract_gsm8k_answer, extract_last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x = \boxed{5}$.", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b^{2}}}}", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),
        (r"$\boxed 5$", "5"),
        ("\\boxed 42\nmore text", "42"),
        (r"\boxed {7}", "7"),
        (r"\fbox{3}", "3"),
        (r"\boxed{1} and later \fbox{9}", "9"),
        (r"\fbox{9} and later \boxed{1}", "1"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
        (r"\boxed{ \left( 3, \frac{\pi}{2} \right) }", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{x}\boxed{", None),  # the last box is broken: no fallback to the earlier one
        (r"\boxed{1", None),
        (r"\boxed{{1}", None),
        (r"\boxed{}", None),
        (r"\boxed{   }", None),
        (r"\boxed", None),
        (r"\boxed$", None),
        (r"\fboxsep=1pt", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_last_boxed(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected


def test_extract_last_boxed_is_linear_on_long_input() -> None:
    text = "{" * 100_000 + r"\boxed{" + "a" * 100_000 + "}"
    assert extract_last_boxed(text) == "a" * 100_000
    assert extract_last_boxed(r"\boxed{" + "{" * 200_000) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes $18.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### 1,234,567.50", "1234567.50"),
        ("#### -5", "-5"),
        ("#### $18.", "18"),
        ("#### 0.5", "0.5"),
        ("#### 7 apples", "7"),
        ("####42", "42"),
        ("#### 1\nreasoning\n#### 2", "2"),
        ("#### \n12", None),  # the number must be on the marker's line
        ("#### none", None),
        ("####", None),
        ("The answer is 5", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text: str, expected: str | None) -> None:
    assert extract_gsm8k_answer(text) == expected
