"""Per-branch text deltas from an engine's request handle, found by diffing it after every step.

The engine reports nothing per token; each request's read-only handle grows in place: trunk tokens go to
`response`, the open block's tokens to `open_branches[i].tokens`, and at a merge (or a cut) the branches
move into `response` in canonical order and a `BlockRecord` is appended. A watcher remembers how far it has read each of those and
turns the growth into deltas: the trunk's (branch None) and each branch's (block, branch, plan id).

Concatenating the trunk's deltas around each block's branch deltas (branch order) gives the answer's text
exactly as the non-streaming response has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from npr.engine import RequestHandle
from npr.serve.schemas import BranchRef


@dataclass(frozen=True)
class TextDelta:
    text: str
    branch: BranchRef | None  # None: the trunk


class Detokenizer:
    """Incremental decoding of one token stream.

    Decodes a short window (the last delta's tokens plus the new ones) and returns what the new tokens add,
    so byte-level pieces of one character wait until the character is complete (no U+FFFD mid-stream).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, ids: list[int], *, final: bool = False) -> str:
        self.ids += ids
        if self.read == len(self.ids):
            return ""
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") and not final:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]


@dataclass
class Progress:
    """What one request added since the last look (for the server's counters)."""

    tokens: int = 0
    forks: int = 0
    branches: int = 0
    deltas: list[TextDelta] = field(default_factory=list)


class RequestWatcher:
    """Reads one engine request's growth; `detokenize=False` only counts (non-streaming requests)."""

    def __init__(self, request: RequestHandle, tokenizer: Any, eos_ids: set[int], *, detokenize: bool):
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.detokenize = detokenize
        self.stops = tuple(request.params.stop)
        # Trunk text that could be the start of a stop string is held back: the answer is cut before it.
        self.hold = max(map(len, self.stops), default=1) - 1
        self.cursor = 0  # response tokens of the trunk already read
        self.blocks_seen = 0  # closed blocks already read
        self.branch_read: list[int] = []  # tokens read per branch of the open block
        self.trunk = Detokenizer(tokenizer)
        self.trunk_text = ""
        self.trunk_sent = 0
        self.branch_text: dict[tuple[int, int], Detokenizer] = {}
        self.counted = (0, 0, 0)  # (tokens, forks, branches) at the last look
        self.done = False

    # ------------------------------------------------------------------ reading

    def poll(self) -> Progress:
        """Everything the request added since the last call; at its finish, also the held-back text."""
        r = self.request
        out = Progress()
        while self.blocks_seen < len(r.blocks):  # blocks merged (or cut) since the last look
            record = r.blocks[self.blocks_seen]
            first = record.branches[0].start if record.branches else len(r.response)
            self._trunk(r.response[self.cursor : first], out, hold=0)
            for i, b in enumerate(record.branches):
                read = self.branch_read[i] if i < len(self.branch_read) else 0
                ids = r.response[b.start + read : b.start + b.length]
                self._branch(self.blocks_seen, i, b.plan_id, ids, out, final=True)
            self.cursor = record.branches[-1].start + record.branches[-1].length if record.branches else first
            self.blocks_seen += 1
            self.branch_read = []
        tail, self.cursor = r.response[self.cursor :], len(r.response)
        branches = r.open_branches
        if r.finished:  # a finish closes the open block first: only the trunk is left
            self._finish(tail, out)
        else:
            # Once a block is open nothing is held: the trunk text must be out before the branches' text.
            self._trunk(tail, out, hold=0 if branches else self.hold)
        for branch in branches:  # the open block
            if branch.index == len(self.branch_read):
                self.branch_read.append(0)
            new = branch.tokens[self.branch_read[branch.index] :]
            self._branch(self.blocks_seen, branch.index, branch.plan_id, new, out)
            self.branch_read[branch.index] = len(branch.tokens)
        self._count(out)
        return out

    def _count(self, out: Progress) -> None:
        r = self.request
        open_branches = len(r.open_branches)
        forks = len(r.blocks) + (1 if open_branches else 0)
        branches = sum(len(b.branches) for b in r.blocks) + open_branches
        now = (r.tokens_used, forks, branches)
        out.tokens, out.forks, out.branches = (a - b for a, b in zip(now, self.counted, strict=True))
        self.counted = now

    # ------------------------------------------------------------------ text

    def _trunk(self, ids: list[int], out: Progress, *, hold: int) -> None:
        """New trunk text, but the last `hold` characters, which might start a stop string."""
        if not self.detokenize:
            return
        self.trunk_text += self.trunk.push([t for t in ids if t not in self.eos_ids])
        end = len(self.trunk_text) - hold
        if end > self.trunk_sent:
            out.deltas.append(TextDelta(self.trunk_text[self.trunk_sent : end], None))
            self.trunk_sent = end

    def _branch(
        self, block: int, index: int, plan_id: str, ids: list[int], out: Progress, *, final: bool = False
    ) -> None:
        """A branch's new text; `final` when its block has closed (its last bytes are flushed)."""
        if not self.detokenize:
            return
        key = (block, index)
        decoder = self.branch_text.pop(key, None) if final else self.branch_text.get(key)
        if decoder is None:
            decoder = Detokenizer(self.tokenizer)
            if not final:
                self.branch_text[key] = decoder
        text = decoder.push([t for t in ids if t not in self.eos_ids], final=final)
        if text:
            out.deltas.append(TextDelta(text, BranchRef(block=block, branch=index, plan_id=plan_id)))

    def _finish(self, ids: list[int], out: Progress) -> None:
        """The trunk's last text, cut before the stop string that ended the answer (as Rollout.text is)."""
        self.done = True
        if not self.detokenize:
            return
        ids = [t for t in ids if t not in self.eos_ids]
        text = self.trunk_text + self.trunk.push(ids, final=True)
        reason = self.request.stop_reason
        if reason in self.stops:
            text = text[: text.rfind(reason)]
        if len(text) > self.trunk_sent:
            out.deltas.append(TextDelta(text[self.trunk_sent :], None))
