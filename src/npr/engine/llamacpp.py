"""llama.cpp as an exact cache backend: branches are llama.cpp sequences in one unified KV cache.

Only the public C API (through llama-cpp-python's low-level bindings) is used, with no patches. A token of
a `llama_batch` carries its own position and sequence ids, and a cell is visible to a query iff they share a
sequence and the cell's position is not after the query's. So, per request:

- the trunk is one sequence; a **fork** copies it (`llama_memory_seq_cp`, no data copied) into one sequence
  per branch, and the `</guideline>` token that triggers it is decoded into the trunk and every branch;
  a branch then decodes at positions g+1, g+2, … and sees the trunk and itself only;
- a **join** copies every branch's cells into the trunk and frees the branch sequences; the takeaway then
  decodes at g+1+max|branch| and sees every branch (DESIGN §3).

llama.cpp requires a sequence's new positions to continue its stored ones, so a takeaway that follows the
last `</step>` in the same step is decoded in a second `llama_decode` after the join; every other step is
one call for all requests and branches. Logits come back to our sampler (token-in, token-out), so a seed
gives the same tokens as on the `hf` backend wherever the logits agree. Exactness needs an f32 KV cache and
flash attention off (the defaults here): an f16 cache moves log-probs by ~1e-2 (DESIGN §10).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npr.engine.kv import TRUNK, Feed

log = logging.getLogger(__name__)

INSTALL_HINT = "install the llama.cpp backend with `make llamacpp` (builds llama-cpp-python from source)"
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16


def import_llama() -> Any:
    """The low-level bindings, or an ImportError that says how to install them."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"backend 'llamacpp' needs the package llama-cpp-python: {INSTALL_HINT}") from e
    return llama_cpp


_LOG_CALLBACK: Any = None  # kept alive: llama.cpp holds a pointer to it


def _route_logs(lib: Any) -> None:
    """Send llama.cpp's own logging to Python's `logging` (it prints every tensor at load otherwise)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    def forward(level: int, text: bytes, _: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            log.error(text.decode("utf-8", "replace").rstrip())

    _LOG_CALLBACK = lib.llama_log_callback(forward)
    lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    lib.llama_backend_init()


class LlamaCppCache:
    """A `CacheBackend` on a GGUF file: requests and their branches as sequences of one unified KV cache.

    `n_ctx` is the number of cache cells shared by all live requests, `n_seq_max` the number of sequences
    (a request holds one, plus one per branch while a block is open). A request is admitted only when its
    worst case (prompt + max_new_tokens cells, 1 + max_plans sequences) fits beside the running ones.
    """

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        *,
        n_ctx: int = 8192,
        n_seq_max: int | None = None,
        n_threads: int | None = None,
        kv_type: str = "f32",
        flash_attn: bool = False,
    ):
        path = Path(gguf)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        self.lib = lib = import_llama()
        _route_logs(lib)
        self.path = path
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise ValueError(
                f"llama.cpp could not load {path}: not a GGUF file, a corrupt one, or an architecture this "
                "llama.cpp build lacks (see the error logged above)"
            )
        limit = int(lib.llama_max_parallel_sequences())
        self.n_seq_max = min(n_seq_max or limit, limit)
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(512, n_ctx)
        params.n_seq_max = self.n_seq_max
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.flash_attn_type = 1 if flash_attn else 0
        params.kv_unified = True
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for {path}")
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        self.mem = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.max_positions = int(lib.llama_model_n_ctx_train(self.model))
        self.device = torch.device("cpu")
        self._cell_bytes = self._bytes_per_cell(4 if kv_type == "f32" else 2)
        self._batch, self._batch_size = None, 0
        self.reset()

    # ------------------------------------------------------------------ metadata

    def token_text(self, token: int) -> str:
        """The GGUF vocabulary's text of a token (to check it against our tokenizer)."""
        raw = self.lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def _bytes_per_cell(self, itemsize: int) -> int:
        arch = self.meta("general.architecture") or ""
        layers = int(self.meta(f"{arch}.block_count") or 0)
        heads = int(self.meta(f"{arch}.attention.head_count") or 1)
        kv_heads = int(self.meta(f"{arch}.attention.head_count_kv") or heads)
        head_dim = self.meta(f"{arch}.attention.key_length")
        dim = int(head_dim) if head_dim else int(self.meta(f"{arch}.embedding_length") or 0) // heads
        return 2 * layers * kv_heads * dim * itemsize

    # ------------------------------------------------------------------ admission

    def check_request(self, cells: int, sequences: int) -> None:
        if cells > self.n_ctx:
            raise ValueError(
                f"the request needs up to {cells} cache cells (prompt + max_new_tokens), more than the "
                f"llama.cpp context holds (n_ctx={self.n_ctx}); lower max_new_tokens or raise n_ctx"
            )
        if sequences > self.n_seq_max:
            raise ValueError(
                f"the request needs {sequences} llama.cpp sequences (1 + max_plans), more than "
                f"n_seq_max={self.n_seq_max}; lower max_plans"
            )

    def reserve(self, owner: int, cells: int, sequences: int) -> bool:
        used_cells = sum(c for c, _ in self._reserved.values())
        used_seqs = sum(s for _, s in self._reserved.values())
        if self._reserved and (used_cells + cells > self.n_ctx or used_seqs + sequences > self.n_seq_max):
            return False
        self._reserved[owner] = (cells, sequences)
        return True

    # ------------------------------------------------------------------ sequences

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)
        self._free = list(range(self.n_seq_max - 1, -1, -1))  # pop() hands out 0 first
        self._trunk: dict[int, int] = {}
        self._branches: dict[int, dict[tuple[int, int], int]] = {}  # owner -> (block, branch) -> seq
        self._reserved: dict[int, tuple[int, int]] = {}
        self._cells: dict[int, int] = {}  # owner -> cells its tokens occupy

    def _new_seq(self) -> int:
        if not self._free:  # admission control makes this unreachable; keep the cache consistent anyway
            raise RuntimeError(f"out of llama.cpp sequences (n_seq_max={self.n_seq_max})")
        return self._free.pop()

    def _drop(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self._free.append(seq)

    def _join(self, owner: int) -> None:
        """Merge: the trunk sees every branch's cells; the branch sequences are freed."""
        trunk = self._trunk[owner]
        for seq in self._branches.pop(owner, {}).values():
            self.lib.llama_memory_seq_cp(self.mem, seq, trunk, -1, -1)
            self._drop(seq)

    def release(self, owner: int) -> None:
        """Free a finished request's sequences and cells at once (llama.cpp frees a cell with its last seq)."""
        for seq in self._branches.pop(owner, {}).values():
            self._drop(seq)
        if owner in self._trunk:
            self._drop(self._trunk.pop(owner))
        self._reserved.pop(owner, None)
        self._cells.pop(owner, None)

    def collect(self) -> None:
        """Nothing to squeeze: llama.cpp reuses freed cells."""

    def slots(self, owner: int) -> int:
        """Cells a request's tokens occupy (0 once it is released)."""
        return self._cells.get(owner, 0)

    def live_sequences(self) -> int:
        return self.n_seq_max - len(self._free)

    def __len__(self) -> int:
        return sum(self._cells.values())

    def bytes_used(self) -> int:
        """Bytes of the keys and values the live requests' cells hold."""
        return len(self) * self._cell_bytes

    # ------------------------------------------------------------------ decoding

    def forward(self, feeds: list[Feed], sample_at: list[int]) -> torch.Tensor:
        """Append `feeds` to their sequences; float32 logits `[len(sample_at), V]` at those feeds."""
        # A trunk feed after branch feeds of the same owner is the takeaway: it is decoded after the join.
        seen_branch: set[int] = set()
        late: set[int] = set()
        for i, f in enumerate(feeds):
            if f.block != TRUNK:
                seen_branch.add(f.owner)
            elif f.owner in seen_branch:
                late.add(i)
        first = [i for i in range(len(feeds)) if i not in late]
        rows: dict[int, torch.Tensor] = {}
        want = set(sample_at)
        self._decode(feeds, first, want, rows)
        if late:
            for owner in {feeds[i].owner for i in late}:
                self._join(owner)
            self._decode(feeds, sorted(late), want, rows)
        return torch.stack([rows[i] for i in sample_at])

    def _seqs(self, feeds: Sequence[Feed], order: list[int]) -> list[list[int]]:
        """Sequence ids per feed; forks open here (the closing token goes to the trunk and every branch)."""
        out: list[list[int]] = []
        opened: dict[int, list[int]] = {}  # owner -> branch seqs opened in this call
        for i in order:
            f = feeds[i]
            if f.owner not in self._trunk:
                self._trunk[f.owner] = self._new_seq()
            trunk = self._trunk[f.owner]
            if f.block == TRUNK:
                out.append([trunk])
                continue
            branches = self._branches.setdefault(f.owner, {})
            key = (f.block, f.branch)
            if key not in branches:
                seq = branches[key] = self._new_seq()
                self.lib.llama_memory_seq_cp(self.mem, trunk, seq, -1, -1)
                opened.setdefault(f.owner, []).append(seq)
            out.append([branches[key]])
        for ids, i in zip(out, order, strict=True):  # the token that forks belongs to every new branch
            f = feeds[i]
            if f.block == TRUNK and f.owner in opened:
                ids += opened[f.owner]
        return out

    def _decode(self, feeds: Sequence[Feed], order: list[int], want: set[int], rows: dict) -> None:
        if not order:
            return
        lib = self.lib
        seqs = self._seqs(feeds, order)
        batch = self._batch_for(len(order))
        batch.n_tokens = len(order)
        outputs = []
        for j, (i, ids) in enumerate(zip(order, seqs, strict=True)):
            f = feeds[i]
            batch.token[j] = f.token
            batch.pos[j] = f.position
            batch.n_seq_id[j] = len(ids)
            for k, s in enumerate(ids):
                batch.seq_id[j][k] = s
            batch.logits[j] = i in want
            if i in want:
                outputs.append((j, i))
            self._cells[f.owner] = self._cells.get(f.owner, 0) + 1
        code = lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} on a batch of {len(order)} tokens")
        for j, i in outputs:
            ptr = lib.llama_get_logits_ith(self.ctx, j)
            rows[i] = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def _batch_for(self, n: int) -> Any:
        if n > self._batch_size:
            if self._batch is not None:
                self.lib.llama_batch_free(self._batch)
            size = max(n, 2 * self._batch_size, 64)
            self._batch, self._batch_size = self.lib.llama_batch_init(size, 0, self.n_seq_max), size
        return self._batch

    def close(self) -> None:
        """Free the context and the model (also done when the object is collected)."""
        if getattr(self, "_batch", None) is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone already
            self.close()
