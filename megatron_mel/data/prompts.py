"""Turning text into the token ids engines and trainer see, and back.

All three prompt kinds (solve, reflect, replay) are formatted the same way (MEL paper-notes gap
21): one user turn through the tokenizer's chat template with the assistant prefix appended, or
the raw text when ``data.apply_chat_template`` is off. Tokenizers load from the local model
directory only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_mel.config import ConfigError

if TYPE_CHECKING:
    from megatron_mel.data.datasets import Problem

log = logging.getLogger(__name__)


@dataclass
class PromptFormatter:
    tokenizer: Any
    apply_chat_template: bool = True
    solve_template: str = "{question}"

    @classmethod
    def from_dir(
        cls,
        hf_dir: str | Path,
        *,
        apply_chat_template: bool = True,
        solve_template: str = "{question}",
    ) -> PromptFormatter:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        except OSError as exc:
            raise ConfigError(f"model.hf_dir: no tokenizer in {hf_dir} ({exc})") from exc
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"model.hf_dir: {hf_dir} has no chat template; set data.apply_chat_template: false"
            )
        return cls(tokenizer, apply_chat_template, solve_template)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn: EOS plus the chat end-of-turn token if distinct."""
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return tuple(sorted(i for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as one user turn, ready for the assistant's reply."""
        if not self.apply_chat_template:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def solve_prompt(self, question: str) -> list[int]:
        return self.encode(self.solve_template.format(question=question))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def drop_long_prompts(
    problems: Sequence[Problem], formatter: PromptFormatter, max_tokens: int
) -> tuple[list[Problem], int]:
    """(problems whose formatted solve prompt fits ``max_tokens``, how many were dropped).

    The count is logged here and reported every step as ``data/prompts_dropped_too_long``;
    ConfigError if nothing fits.
    """
    kept = [p for p in problems if len(formatter.solve_prompt(p.question)) <= max_tokens]
    dropped = len(problems) - len(kept)
    if not kept:
        raise ConfigError(f"data.max_prompt_tokens={max_tokens}: every prompt is longer")
    if dropped:
        log.warning("%d of %d training prompts are longer than data.max_prompt_tokens=%d "
                    "tokens and were dropped", dropped, len(problems), max_tokens)  # fmt: skip
    return kept, dropped
