"""Turning a step's logits into tokens, all rows at once: branch-only penalty, temperature, top-k/p.

One batched pass instead of a loop over rows: at a fork a request decodes several branches per step, and
per-row sorts and draws would make each branch cost more than the model's forward on a small model.
Every row keeps its own generator (one uniform draw per row, inverse-CDF sampling), so a seeded request
gives the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from npr.engine.params import SamplingParams


def repetition_penalty(
    logits: torch.Tensor, penalised: Sequence[list[int] | None], penalty: torch.Tensor
) -> None:
    """CTRL-style penalty, in place: divide positive logits of seen tokens, multiply negative ones."""
    unique = [set(seen or ()) for seen in penalised]
    rows = [i for i, ids in enumerate(unique) for _ in ids]
    if not rows:
        return
    cols = [t for ids in unique for t in ids]
    r, c = torch.tensor(rows), torch.tensor(cols)
    vals, p = logits[r, c], penalty[r]
    logits[r, c] = torch.where(vals > 0, vals / p, vals * p)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    penalised: Sequence[list[int] | None],
) -> list[int]:
    """One token per row of `[P, V]` float32 logits (already through the row's logits processors).

    `penalised[i]` (given only inside a step) are the ids that get row i's branch repetition penalty.
    Top-k is applied before top-p, and top-p keeps the smallest prefix of the sorted tokens whose mass
    reaches `top_p` (the token that crosses it included).

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_tokens(torch.tensor([[0.0, 5.0, 1.0]]), [SamplingParams(temperature=0)], [g], [None])
    [1]
    >>> sample_tokens(torch.tensor([[0.0, 5.0, 1.0]]), [SamplingParams(top_k=1)], [g], [None])
    [1]
    """
    if not params:
        return []
    logits = logits.clone()
    vocab = logits.shape[1]
    repetition_penalty(logits, penalised, torch.tensor([p.branch_repetition_penalty for p in params]))
    greedy = torch.tensor([p.temperature == 0 for p in params])
    temperature = torch.tensor([p.temperature or 1.0 for p in params])
    top_k = torch.tensor([p.top_k or vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params])

    sorted_logits, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    cdf = probs.cumsum(-1)
    keep = (cdf - probs < top_p[:, None]) & (rank < top_k[:, None])  # a prefix of every sorted row
    last = keep.sum(-1, keepdim=True) - 1
    cdf = cdf.masked_fill(~keep, float("inf"))
    u = torch.cat([torch.rand(1, generator=g) for g in generators])[:, None] * cdf.gather(1, last)
    pick = torch.minimum(torch.searchsorted(cdf, u, right=True), last)
    drawn = order.gather(1, pick).view(-1)
    return torch.where(greedy, logits.argmax(-1), drawn).tolist()
