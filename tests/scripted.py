"""A logits processor that scripts the structure of a response so a random model forks on cue.

Tags and plan text are forced; branch, takeaway and final contents are left to the model (tags and
end-of-sequence banned there), so the engine really samples most tokens and log-prob parity is meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npr.format import TagIds


@dataclass
class Script:
    """branch_lens[b][i]: free tokens in branch i of block b; takeaway and final free tokens likewise."""

    tokenizer: object
    branch_lens: list[list[int]]
    takeaway_len: int = 3
    final_len: int = 2
    answer: str = "5"

    def __post_init__(self) -> None:
        self.tags = TagIds.from_tokenizer(self.tokenizer)
        self.banned = [*self.tags.as_tuple(), self.tokenizer.eos_token_id]
        self._ids: dict[str, list[int]] = {}  # called once per row and step: tokenise each text once

    def _enc(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[text]

    def _guideline(self, n: int) -> list[int]:
        t = self.tags
        ids = [t.guideline_open]
        for i in range(1, n + 1):
            ids += [t.plan_open, *self._enc(f"{i}: do part {i}"), t.plan_close]
        return [*ids, t.guideline_close]

    def _digit(self, token: int) -> int | None:
        text = self.tokenizer.decode([token])
        return int(text) if text.isdigit() else None

    def _force(self, logits: torch.Tensor, token: int) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[token] = 0.0
        return out

    def _free(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.banned] = float("-inf")
        return logits

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        t = self.tags

        def last(tok: int) -> int:
            return max((i for i, x in enumerate(visible) if x == tok), default=-1)

        block = visible.count(t.takeaway_close)
        g_open, s_open, s_close = last(t.guideline_open), last(t.step_open), last(t.step_close)
        t_open, t_close = last(t.takeaway_open), last(t.takeaway_close)
        if s_open > max(s_close, t_close):  # inside a branch (siblings are invisible)
            plan = sum(1 for x in visible[g_open:s_open] if x == t.step_close) + 1  # sequential order
            digit = self._digit(visible[s_open + 1]) if s_open + 1 < len(visible) else None
            if digit is not None:  # forked: ID is forced
                plan = digit
            ident = self._enc(f"{plan}:")
            written = len(visible) - s_open - 1
            if written < len(ident):  # sequential mode writes the ID itself
                return self._force(logits, ident[written])
            if written - len(ident) >= self.branch_lens[block][plan - 1]:
                return self._force(logits, t.step_close)
            return self._free(logits)
        if t_open > t_close:  # inside a takeaway
            if len(visible) - t_open - 1 >= self.takeaway_len:
                return self._force(logits, t.takeaway_close)
            return self._free(logits)
        if block < len(self.branch_lens):
            if g_open <= t_close:
                return self._force(logits, t.guideline_open)
            script = self._guideline(len(self.branch_lens[block]))
            written = len(visible) - g_open
            if written < len(script):
                return self._force(logits, script[written])
            steps = sum(1 for x in visible[g_open:] if x == t.step_close)  # sequential mode writes its steps
            return self._force(
                logits, t.step_open if steps < len(self.branch_lens[block]) else t.takeaway_open
            )
        tail = self._enc(f" \\boxed{{{self.answer}}}")
        written = len(visible) - t_close - 1
        if written < self.final_len:
            return self._free(logits)
        if written - self.final_len < len(tail):
            return self._force(logits, tail[written - self.final_len])
        return self._force(logits, self.tokenizer.eos_token_id)


@dataclass
class PerPrompt:
    """Dispatch to a different Script per prompt, so one batch can mix fork shapes."""

    scripts: dict[tuple[int, ...], Script]

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        for prompt, script in self.scripts.items():
            if tuple(visible[: len(prompt)]) == prompt:
                return script(visible, logits)
        raise KeyError("no script for this prompt")
