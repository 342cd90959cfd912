"""One flat KV pool shared by every request and branch, with a visibility rule instead of copies.

All tokens of all live requests sit in a single cache sequence (batch size 1). Each slot remembers its
owner request, its block and its branch; a query sees a slot iff it has the same owner, came no later, and
is not a sibling branch of the same block. So a prefix is stored once however many branches read it,
ragged requests need no padding, and one forward per step advances everything (DESIGN §4).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

TRUNK = -1  # block/branch id of tokens outside any branch


@dataclass(frozen=True)
class Feed:
    """One token to append to the pool this step."""

    owner: int  # request uid
    token: int
    position: int
    block: int = TRUNK  # globally unique block uid for branch tokens
    branch: int = TRUNK


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """Cache layers that hold tensors (a fresh cache initialises its layers lazily)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5.x calls the cache `cache=`, 4.x `past_key_values=` (DESIGN §9)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVPool:
    """The shared cache plus per-slot metadata; `forward` appends feeds and returns selected logits."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._cache_kw = cache_kwarg(model)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        self.owner, self.block, self.branch = empty, empty.clone(), empty.clone()  # [S] each
        self.dead: set[int] = set()

    def __len__(self) -> int:
        return len(self.owner)

    def bytes_used(self) -> int:
        """Bytes held by keys and values of all layers."""
        layers = _kv_layers(self.cache)
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))

    def _mask(self, owner: torch.Tensor, block: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        q, s = len(owner), len(self.owner)  # queries are the last q of s slots
        visible = owner[:, None] == self.owner[None, :]  # [Q, S]
        slot = torch.arange(s, device=self.device)
        visible &= slot[None, :] <= (s - q + torch.arange(q, device=self.device))[:, None]
        sibling = (block[:, None] == self.block[None, :]) & (block[:, None] != TRUNK)
        visible &= ~(sibling & (branch[:, None] != self.branch[None, :]))
        mask = torch.zeros(q, s, dtype=self.dtype, device=self.device)
        # finfo.min, not -inf and not a bool mask: eager attention adds it, and a row stays finite.
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[None, None]  # [1, 1, Q, S]

    @torch.inference_mode()
    def forward(self, feeds: list[Feed], sample_at: list[int]) -> torch.Tensor:
        """Append `feeds` to the pool; return float32 logits `[len(sample_at), V]` at those feed indices."""
        dev = self.device
        ids = torch.tensor([[f.token for f in feeds]], device=dev)  # [1, Q]
        pos = torch.tensor([[f.position for f in feeds]], device=dev)  # [1, Q]
        owner = torch.tensor([f.owner for f in feeds], device=dev)
        block = torch.tensor([f.block for f in feeds], device=dev)
        branch = torch.tensor([f.branch for f in feeds], device=dev)
        self.owner = torch.cat([self.owner, owner])
        self.block = torch.cat([self.block, block])
        self.branch = torch.cat([self.branch, branch])
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=self._mask(owner, block, branch),
            use_cache=True,
            logits_to_keep=torch.tensor(sample_at, device=dev),
            **{self._cache_kw: self.cache},
        )
        return out.logits[0].float()  # [P, V]

    def release(self, owner: int) -> None:
        """Mark a finished request's slots dead; compact once dead slots dominate."""
        self.dead.add(owner)
        dead = torch.isin(self.owner, torch.tensor(sorted(self.dead), device=self.device))
        n_dead = int(dead.sum())
        if n_dead and n_dead * 2 >= len(self.owner):
            self._compact(~dead)

    def _compact(self, keep: torch.Tensor) -> None:
        idx = keep.nonzero().flatten()
        for layer in _kv_layers(self.cache):
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)
        self.owner, self.block, self.branch = self.owner[idx], self.block[idx], self.branch[idx]
        self.dead = set()
