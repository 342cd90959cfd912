"""One self-contained HTML page that draws rollouts as reasoning graphs (no network, no external files).

Python computes everything the page shows and embeds it as JSON: per rollout, its trunk segments and
parallel branches (token counts, position ranges, text when a tokenizer is given), which nodes make up the
critical path, and the attention picture from `npr.layout` (positions, and for each query row the spans of
earlier keys it may not see). The inline script only draws: an SVG graph per rollout, and on demand the mask
and the positions on canvases.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any

import torch

from npr.engine import Rollout
from npr.format import TagIds
from npr.layout import BRANCH, PROMPT, TRUNK, Layout, LayoutError, build_layout

Decode = Callable[[list[int]], str]


# ---------------------------------------------------------------------------------------------- graph


def _node(
    r: Rollout, kind: str, start: int, length: int, decode: Decode | None, **extra: Any
) -> dict[str, Any]:
    p = len(r.prompt_ids)
    ids = r.token_ids[start : start + length]
    return {
        "kind": kind,
        "start": start,
        "length": length,
        "pos": [r.position_ids[p + start], r.position_ids[p + start + length - 1]],
        "text": decode(ids) if decode else None,
        **extra,
    }


def graph(r: Rollout, decode: Decode | None = None) -> dict[str, Any]:
    """Trunk segments and blocks of parallel branches, in response order; the critical path marked.

    The critical path is the trunk plus, in each block, the longest branch: the takeaway sits right after it.
    """
    parts: list[dict[str, Any]] = []
    cursor = 0
    for k, block in enumerate(r.blocks):
        if not block.branches:
            continue
        first = block.branches[0].start
        if first > cursor:
            parts.append(_node(r, "trunk", cursor, first - cursor, decode, critical=True))
        longest = max(range(len(block.branches)), key=lambda i: block.branches[i].length)
        branches = [
            _node(r, "branch", b.start, b.length, decode, block=k, branch=i, plan_id=b.plan_id,
                  finished=b.finished, critical=i == longest)
            for i, b in enumerate(block.branches)
        ]  # fmt: skip
        parts.append(
            {
                "kind": "block",
                "block": k,
                "guideline_position": block.guideline_position,
                "takeaway_position": block.takeaway_position,
                "branches": branches,
            }
        )
        cursor = block.branches[-1].start + block.branches[-1].length
    if cursor < len(r.token_ids):
        parts.append(_node(r, "trunk", cursor, len(r.token_ids) - cursor, decode, critical=True))
    return {"parts": parts}


# ---------------------------------------------------------------------------------------------- layout


def _layout_from_records(r: Rollout) -> Layout:
    """The layout as the engine recorded it (positions, branch spans), for pages made without a tokenizer."""
    n, p = len(r.prompt_ids) + len(r.token_ids), len(r.prompt_ids)
    segment = torch.full((n,), TRUNK, dtype=torch.long)
    segment[:p] = PROMPT
    block = torch.full((n,), -1, dtype=torch.long)
    branch = torch.full((n,), -1, dtype=torch.long)
    for k, b in enumerate(r.blocks):
        for i, x in enumerate(b.branches):
            block[p + x.start : p + x.start + x.length] = k
            branch[p + x.start : p + x.start + x.length] = i
    segment[block >= 0] = BRANCH
    ids = torch.tensor(r.prompt_ids + r.token_ids, dtype=torch.long)
    return Layout(ids, torch.tensor(r.position_ids, dtype=torch.long), segment, block, branch, p)


def _hidden_spans(lay: Layout) -> list[list[int]]:
    """[row, first, last] for each run of earlier keys a query row may not see (sibling branches)."""
    hidden = torch.ones(len(lay), len(lay), dtype=torch.bool).tril() & ~lay.visible()  # [L, L]
    spans: list[list[int]] = []
    for row in hidden.any(dim=1).nonzero().flatten().tolist():
        cols = hidden[row].nonzero().flatten()
        breaks = (cols[1:] - cols[:-1] > 1).nonzero().flatten().tolist()
        starts = [0, *(b + 1 for b in breaks)]
        ends = [*breaks, len(cols) - 1]
        spans += [[row, int(cols[a]), int(cols[b])] for a, b in zip(starts, ends, strict=True)]
    return spans


def layout_picture(r: Rollout, tags: TagIds | None = None) -> dict[str, Any]:
    """What the mask/position view draws. With tag ids the layout is rebuilt from the token ids by
    `build_layout` (and checked against the engine's positions); without, it comes from the records."""
    note = None
    lay = None
    if tags is not None:
        try:
            ids = r.prompt_ids + r.token_ids
            lay = build_layout(ids, tags, len(r.prompt_ids), parallel=r.mode == "parallel", strict=False)
            if lay.position_ids.tolist() != r.position_ids:
                note, lay = "build_layout's positions differ from the engine's; showing the engine's", None
        except LayoutError as e:
            note = f"build_layout refused this sequence ({e}); showing the engine's records"
    source = "build_layout" if lay is not None else "records"
    lay = lay or _layout_from_records(r)
    return {
        "source": source,
        "note": note,
        "prompt_len": lay.prompt_len,
        "positions": lay.position_ids.tolist(),
        "segment": lay.segment.tolist(),
        "branch": lay.branch.tolist(),
        "hidden": _hidden_spans(lay),
    }


# ---------------------------------------------------------------------------------------------- page


def rollout_data(r: Rollout, tokenizer: Any = None) -> dict[str, Any]:
    """Everything the page shows about one rollout (JSON-ready)."""
    tags = TagIds.from_tokenizer(tokenizer) if tokenizer is not None else None
    decode: Decode | None = None
    if tokenizer is not None:
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    s = r.stats
    return {
        "index": r.index,
        "sample": r.sample,
        "mode": r.mode,
        "finish_reason": r.finish_reason.value,
        "stop_reason": r.stop_reason,
        "answer": r.answer,
        "text": r.text,
        "stats": {
            "total_tokens": s.total_tokens,
            "critical_path_tokens": s.critical_path_tokens,
            "forks": s.forks,
            "branches": s.branches,
            "wall_time": s.wall_time,
            "ideal_speedup": s.total_tokens / s.critical_path_tokens if s.critical_path_tokens else 1.0,
        },
        "graph": graph(r, decode),
        "layout": layout_picture(r, tags),
    }


def _embed(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in, whatever text the rollouts hold."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(rollouts: Sequence[Rollout], tokenizer: Any = None, *, title: str = "npr rollouts") -> str:
    """The page as one HTML string. A tokenizer adds each node's text and rebuilds the layout from ids."""
    template = files("npr.viz").joinpath("template.html").read_text(encoding="utf-8")
    data = {"title": title, "rollouts": [rollout_data(r, tokenizer) for r in rollouts]}
    return template.replace("__NPR_TITLE__", html.escape(title)).replace("__NPR_DATA__", _embed(data))
