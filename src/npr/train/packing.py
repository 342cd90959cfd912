"""Packing sequences into rows of a token budget, and rows into micro-batches (DESIGN §5).

Padding every sequence of a micro-batch to its longest wastes the difference; packing puts several whole
sequences back to back in one row of at most `max_tokens_per_row` tokens (the layout's metadata keeps
documents apart: no attention across them, positions restart). A forward pass then holds
`micro_batch_tokens // max_tokens_per_row` rows (at least one), so micro-batches are sized by tokens, not
by a number of sequences. Packing only regroups a step's sequences: the loss is a token mean over the
step, so packed and unpacked steps compute the same loss and gradients (tested to 1e-5).

>>> pack([5, 3, 4, 2], 8)          # first fit, longest first
[[0, 1], [2, 3]]
>>> micro_batches([[0, 1], [2, 3], [4]], rows_per_batch=2)
[[[0, 1], [2, 3]], [[4]]]
"""

from __future__ import annotations

from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens (first fit decreasing).

    Deterministic (ties keep input order), and each row lists its sequences in input order.
    """
    if capacity < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than max_tokens_per_row {capacity}")
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return [sorted(row) for row in rows]


def micro_batches(rows: Sequence[list[int]], rows_per_batch: int) -> list[list[list[int]]]:
    """Consecutive groups of `rows_per_batch` rows: the forward passes of a step."""
    return [list(rows[i : i + rows_per_batch]) for i in range(0, len(rows), rows_per_batch)]


def padding_share(batches: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int]) -> float:
    """Share of the token slots of right-padded `[rows, longest row]` micro-batches that hold padding."""
    slots = used = 0
    for batch in batches:
        widths = [sum(lengths[i] for i in row) for row in batch]
        slots += len(widths) * max(widths)
        used += sum(widths)
    return 1 - used / slots if slots else 0.0


def plan_micro_batches(
    lengths: Sequence[int], *, packing: bool, capacity: int, rows_per_batch: int, batch_size: int
) -> list[list[list[int]]]:
    """The forward passes over sequences of `lengths`: micro-batches of rows of sequence indices.

    Packed: rows of at most `capacity` tokens, `rows_per_batch` rows per pass. Unpacked: one sequence
    per row, `batch_size` rows per pass, in input order.
    """
    if packing:
        return micro_batches(pack(lengths, capacity), rows_per_batch)
    singles = [[i] for i in range(len(lengths))]
    return micro_batches(singles, batch_size)


def local_rows(batch: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """A micro-batch's sequence indices in row order, and its rows as positions in that list.

    >>> local_rows([[4, 7], [2]])
    ([4, 7, 2], [[0, 1], [2]])
    """
    flat = [i for row in batch for i in row]
    rows, start = [], 0
    for row in batch:
        rows.append(list(range(start, start + len(row))))
        start += len(row)
    return flat, rows
