"""What the engine returns for one sample: tokens, positions, log-probs, the branch tree and stats."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npr.engine.params import FinishReason
from npr.files import atomic_write
from npr.format import extract_answer


@dataclass
class BranchRecord:
    plan_id: str
    start: int  # index of the branch's <step> in the response ids
    length: int  # tokens from <step> to </step> inclusive (or to the cut)
    finished: bool  # reached </step>


@dataclass
class BlockRecord:
    guideline_position: int  # position id g of </guideline>
    branches: list[BranchRecord]
    takeaway_position: int | None = None  # g + 1 + longest branch, None if the block was cut


@dataclass
class RolloutStats:
    total_tokens: int = 0  # every generated token of every branch, forced ones included
    critical_path_tokens: int = 0  # response positions used: the sequential depth of the answer
    forks: int = 0
    branches: int = 0
    wall_time: float = 0.0  # seconds from admission to finish


@dataclass
class Rollout:
    index: int  # prompt index in the generate() call
    sample: int  # which of the n samples of that prompt
    prompt_ids: list[int]
    token_ids: list[int]  # response ids in canonical order: trunk, branch 1..n, takeaway, …
    position_ids: list[int]  # for prompt + response, as npr.layout builds them
    sampled_logprobs: list[float]  # log-softmax of the raw logits at each sampled token; 0.0 if forced
    loss_mask: list[int]  # 1 for sampled tokens, 0 for forced ones
    text: str
    finish_reason: FinishReason
    stop_reason: str | None = None
    mode: str = "parallel"
    blocks: list[BlockRecord] = field(default_factory=list)
    stats: RolloutStats = field(default_factory=RolloutStats)

    @property
    def answer(self) -> str | None:
        return extract_answer(self.text)

    @property
    def is_parallel(self) -> bool:
        """At least one real fork happened."""
        return self.stats.forks > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Rollout:
        d = dict(d)
        if "logprobs" in d:  # files written before the rename
            d["sampled_logprobs"] = d.pop("logprobs")
        d["finish_reason"] = FinishReason(d["finish_reason"])
        d["blocks"] = [
            BlockRecord(
                b["guideline_position"], [BranchRecord(**x) for x in b["branches"]], b["takeaway_position"]
            )
            for b in d.get("blocks", [])
        ]
        d["stats"] = RolloutStats(**d.get("stats", {}))
        return cls(**d)


def save_rollouts(rollouts: Iterable[Rollout], path: str | Path) -> None:
    """Write JSONL atomically (temp file + rename): a crash never leaves half a file."""
    atomic_write(path, "".join(json.dumps(r.to_dict()) + "\n" for r in rollouts))


def load_rollouts(path: str | Path) -> list[Rollout]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Rollout.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: not a rollout record ({e})") from e
    return out
