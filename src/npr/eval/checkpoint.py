"""Released checkpoints: resolve `--model` (a folder, a named model, `tiny`, or a hub id) and check that the
checkpoint's own tokenizer has the tag tokens before a parallel evaluation loads its weights.

The released NPR models (`bigai-NPR/NPR-4B`, …) carry the 8 tags as added tokens, with ids of their own; a
checkpoint without them cannot be decoded in parallel, and adding fresh tags to it (as `npr.model.load_model`
does for seed models) would evaluate untrained rows, so the evaluation refuses it and names the missing tags.
"""

from __future__ import annotations

import re
from pathlib import Path

from npr.format import TAGS
from npr.model import TINY

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CheckpointError(ValueError):
    """A `--model` that cannot be used: the message names it and says what to do."""


def _named_models() -> list[str]:
    from npr.hub import NAMED_MODELS

    return [TINY, *NAMED_MODELS]


def resolve_checkpoint(model: str) -> str:
    """`tiny`, a named model or an existing path as given; a hub id (`owner/name`) as its local snapshot.

    A hub id is looked up in the local hub cache first; it is downloaded only when the hub is reachable
    (`HF_HUB_OFFLINE` unset). A local folder of the same name wins over the hub.
    """
    if model in _named_models() or Path(model).expanduser().exists():
        return model
    if not _HUB_ID.fullmatch(model):
        raise CheckpointError(
            f"--model {model}: no such folder, and not a hub id 'owner/name' (names: {_named_models()})"
        )
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except Exception:  # not in the local cache (huggingface_hub raises several kinds)
        pass
    fix = f"download it where the hub is reachable (`huggingface-cli download {model} --local-dir DIR`) and pass --model DIR"
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"--model {model}: not a local folder, and the hub is offline; {fix}")
    try:
        return snapshot_download(model)
    except Exception as e:
        raise CheckpointError(
            f"--model {model}: not a local folder, and the hub download failed ({type(e).__name__}: {e}); {fix}"
        ) from e


def missing_tags(source: str) -> list[str]:
    """The tag strings that the checkpoint's own tokenizer lacks as added tokens (`tiny` has them all)."""
    if source == TINY:
        return []
    from transformers import AutoTokenizer

    from npr.model import resolve_model_source
    from npr.train.checkpoint import resolve_model_dir

    folder = resolve_model_dir(resolve_model_source(source))  # a run directory: its latest checkpoint
    added = AutoTokenizer.from_pretrained(folder).get_added_vocab()
    return [t for t in TAGS if t not in added]


def require_tags(source: str, *, why: str = "parallel decoding") -> None:
    """Refuse a checkpoint whose tokenizer lacks tag tokens; the error names each missing tag."""
    missing = missing_tags(source)
    if missing:
        raise CheckpointError(
            f"checkpoint {source}: its tokenizer has no tag tokens {missing}, which {why} needs "
            "(a released NPR-Beta/NPR model has all 8; evaluate a stage-1 model such as NPR-Zero with "
            "--mode sequential)"
        )
