"""The engine's KV cache: one row per request, branches of a request share that row's prefix.

Each row holds one request's tokens: prompt, trunk and every branch, in the order they were decoded. A
slot remembers its block and branch; a query sees a slot of its own row iff the slot is real (not
padding), came no later, and is not a sibling branch of the same block. So a prefix is stored once however
many branches read it, and one forward per step advances every branch of every request: a ragged batch
with per-row 4D masks and position ids (DESIGN §4).

New requests are prefilled in a forward of their own (so a long prompt does not pad every other row) and
their rows are appended to the batch. Finished rows are dropped, and padding is squeezed out once it
dominates.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

TRUNK = -1  # block/branch id of tokens outside any branch


@dataclass(frozen=True)
class Feed:
    """One token to append to its request's row this step."""

    owner: int  # request uid
    token: int
    position: int
    block: int = TRUNK  # block uid for branch tokens
    branch: int = TRUNK


def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5.x calls the cache `cache=`, 4.x `past_key_values=` (DESIGN §9)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """Cache layers that hold tensors (a fresh cache initialises its layers lazily)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


@dataclass
class _Rows:
    """A batch of rows: their cache and per-slot metadata (all `[B, S]`)."""

    owners: list[int]
    cache: DynamicCache
    block: torch.Tensor
    branch: torch.Tensor
    valid: torch.Tensor  # False on padding slots

    def pad_to(self, length: int) -> None:
        extra = length - self.valid.shape[1]
        if extra <= 0:
            return
        for layer in _kv_layers(self.cache):  # keys/values: [B, H, S, D]
            layer.keys = F.pad(layer.keys, (0, 0, 0, extra))
            layer.values = F.pad(layer.values, (0, 0, 0, extra))
        self.block = F.pad(self.block, (0, extra), value=TRUNK)
        self.branch = F.pad(self.branch, (0, extra), value=TRUNK)
        self.valid = F.pad(self.valid, (0, extra), value=False)

    def select(self, rows: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Keep `rows` `[B']`, and per row the slots `slots` `[B', S']` (None = all)."""
        for layer in _kv_layers(self.cache):
            for name in ("keys", "values"):
                t = getattr(layer, name).index_select(0, rows)
                if slots is not None:
                    t = t.gather(2, slots[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
                setattr(layer, name, t)
        for name in ("block", "branch", "valid"):
            t = getattr(self, name).index_select(0, rows)
            setattr(self, name, t if slots is None else t.gather(1, slots))
        self.owners = [self.owners[i] for i in rows.tolist()]


class KVPool:
    """All live requests' caches; `forward` appends feeds and returns logits at the sample points."""

    def __init__(self, model: PreTrainedModel, pad_id: int = 0):
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = pad_id
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self._cache_kw = cache_kwarg(self.decoder)
        self.reset()

    def reset(self) -> None:
        self.rows = self._empty_rows(0)
        self.dead: set[int] = set()

    def check_request(self, cells: int, sequences: int) -> None:
        """Any request fits: rows grow as needed (the model's context is checked by the engine)."""

    def reserve(self, owner: int, cells: int, sequences: int) -> bool:
        return True

    def _empty_rows(self, n: int) -> _Rows:
        empty = torch.empty(n, 0, dtype=torch.long, device=self.device)
        return _Rows([], DynamicCache(), empty, empty.clone(), empty.bool())

    def __len__(self) -> int:
        """Real (non-padding) slots held by live requests."""
        return int(self.rows.valid.sum())

    def slots(self, owner: int) -> int:
        """Real slots a request holds (0 once its row is freed)."""
        if owner in self.dead or owner not in self.rows.owners:
            return 0
        return int(self.rows.valid[self.rows.owners.index(owner)].sum())

    def bytes_used(self) -> int:
        """Bytes held by keys and values of all layers, padding included."""
        layers = _kv_layers(self.rows.cache)
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))

    def release(self, owner: int) -> None:
        """Mark a finished request's row for freeing; `collect` frees all marked rows in one copy."""
        self.dead.add(owner)

    @torch.inference_mode()
    def forward(self, feeds: list[Feed], sample_at: list[int]) -> torch.Tensor:
        """Append `feeds` to their rows; return float32 logits `[len(sample_at), V]` at those feeds."""
        self.collect()
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feeds):
            groups.setdefault(f.owner, []).append(i)
        known = set(self.rows.owners)
        fresh_owners = [o for o in groups if o not in known]
        hidden: dict[int, torch.Tensor] = {}  # feed index -> final hidden state [H]
        want = set(sample_at)
        if self.rows.owners:
            self._run(self.rows, groups, feeds, want, hidden)
        if fresh_owners:  # prefill in a forward of its own: a prompt would pad every running row
            fresh = self._empty_rows(len(fresh_owners))
            fresh.owners = fresh_owners
            self._run(fresh, groups, feeds, want, hidden)
            self._append(fresh)
        h = torch.stack([hidden[i] for i in sample_at])  # [P, H]
        return self.head(h).float()  # [P, V]

    def _run(
        self, rows: _Rows, groups: dict[int, list[int]], feeds: list[Feed], want: set[int], hidden: dict
    ) -> None:
        dev = self.device
        per_row = [groups.get(o, []) for o in rows.owners]
        b, q = len(per_row), max(1, max(map(len, per_row)))
        ids = torch.full((b, q), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, q), dtype=torch.long)
        qblock = torch.full((b, q), TRUNK, dtype=torch.long)
        qbranch = torch.full((b, q), TRUNK, dtype=torch.long)
        qvalid = torch.zeros((b, q), dtype=torch.bool)
        for r, idxs in enumerate(per_row):
            for j, i in enumerate(idxs):
                f = feeds[i]
                ids[r, j], pos[r, j], qblock[r, j], qbranch[r, j] = f.token, f.position, f.block, f.branch
                qvalid[r, j] = True
        ids, pos, qblock, qbranch, qvalid = (t.to(dev) for t in (ids, pos, qblock, qbranch, qvalid))
        s = rows.valid.shape[1]
        kblock = torch.cat([rows.block, qblock], 1)  # [B, S+Q]
        kbranch = torch.cat([rows.branch, qbranch], 1)
        kvalid = torch.cat([rows.valid, qvalid], 1)
        order = torch.cat([torch.full((s,), -1, device=dev), torch.arange(q, device=dev)])  # new-slot index
        qi = torch.arange(q, device=dev)
        visible = kvalid[:, None, :] & (order[None, None, :] <= qi[None, :, None])  # [B, Q, S+Q]
        sibling = (qblock[:, :, None] == kblock[:, None, :]) & (qblock[:, :, None] != TRUNK)
        visible &= ~(sibling & (qbranch[:, :, None] != kbranch[:, None, :]))
        # A padding query sees only itself, so its softmax stays finite.
        itself = torch.zeros(q, s + q, dtype=torch.bool, device=dev)
        itself[qi, s + qi] = True
        visible = torch.where(qvalid[:, :, None], visible, itself[None])
        # finfo.min, not -inf and not a bool mask: eager attention adds it, and rows stay finite.
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.decoder(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask[:, None],
            use_cache=True,
            **{self._cache_kw: rows.cache},
        )
        h = out.last_hidden_state  # [B, Q, H]
        for r, idxs in enumerate(per_row):
            for j, i in enumerate(idxs):
                if i in want:
                    hidden[i] = h[r, j]
        rows.block, rows.branch, rows.valid = kblock, kbranch, kvalid

    def _append(self, fresh: _Rows) -> None:
        """Add freshly prefilled rows to the batch (both padded to one length)."""
        if not self.rows.owners:
            self.rows = fresh
            return
        length = max(self.rows.valid.shape[1], fresh.valid.shape[1])
        self.rows.pad_to(length)
        fresh.pad_to(length)
        for mine, theirs in zip(_kv_layers(self.rows.cache), _kv_layers(fresh.cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        for name in ("block", "branch", "valid"):
            setattr(self.rows, name, torch.cat([getattr(self.rows, name), getattr(fresh, name)]))
        self.rows.owners += fresh.owners

    def collect(self) -> None:
        """Drop released rows; squeeze padding out once it is most of the cache."""
        rows = self.rows
        if self.dead & set(rows.owners):
            keep = [i for i, o in enumerate(rows.owners) if o not in self.dead]
            if not keep:
                self.rows = self._empty_rows(0)
                rows = self.rows
            else:
                rows.select(torch.tensor(keep, device=self.device))
        self.dead.clear()
        count = rows.valid.sum(1)  # [B]
        if rows.valid.numel() < 256 or int(count.sum()) * 2 > rows.valid.numel():
            return
        length = int(count.max())
        # Real slots first, in their order (stable sort), then cut to the longest row.
        slots = torch.sort((~rows.valid).to(torch.int8), dim=1, stable=True).indices[:, :length]  # [B, S']
        rows.select(torch.arange(len(rows.owners), device=self.device), slots)
        rows.valid = torch.arange(length, device=self.device)[None, :] < count[:, None]
