"""Stage and evaluation caches: a folder is reused only if it was made with the same settings and inputs.

A stage is done when its folder holds `done.json`, which also records the stage's settings and a hash of what
it read (weights, data). A re-run after the config or an earlier stage changed stops with `StaleStageError`
naming the stage, instead of silently standing in for a different run.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npr.files import atomic_write


class StaleStageError(RuntimeError):
    """A cached stage was made with other settings or inputs than the current run would use."""


def content_hash(path: str | Path) -> str:
    """Short sha256 of a file, or of a model folder's weight files: what a stage read.

    >>> content_hash("no/such/file")
    'missing'
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not path.exists() or not files:
        return "missing"
    stats = [(str(f), f.stat()) for f in files]
    return _hash_files(tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats))


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed on path, mtime and size: a run hashes each model once however many caches check it."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from a JSON file (tuples become lists …), so comparisons are fair."""
    return json.loads(json.dumps(settings))


def read_cached(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What a JSON cache holds (less its settings) if it was made with these settings, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.pop("settings", None) == as_json(settings) else None


def write_cached(path: Path, content: dict[str, Any], settings: dict[str, Any]) -> None:
    atomic_write(path, json.dumps({**content, "settings": settings}))


def _same(before: Any, now: Any) -> bool:
    """Equal settings, where a key of a nested mapping that `before` lacks is a field added since the stage
    ran (a new trainer option at its default) and does not count: the run did what that default does."""
    if isinstance(before, dict) and isinstance(now, dict):
        return set(before) <= set(now) and all(_same(v, now[k]) for k, v in before.items())
    return bool(before == now)


def run_stage(
    folder: Path,
    run: Callable[[Path], dict[str, Any]],
    settings: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """`run(folder)`'s result, or the cached one when `folder/done.json` has these settings.

    Raises StaleStageError when the folder is done with other settings; the folder is kept.
    """
    stage = folder.name
    settings = as_json(settings)
    done_file = folder / "done.json"
    if done_file.exists():
        done = json.loads(done_file.read_text())
        before = done.pop("settings", {})
        changed = sorted(k for k in {*before, *settings} if not _same(before.get(k), settings.get(k)))
        if changed:
            raise StaleStageError(
                f"[{stage}] {folder} was made with other settings (changed: {', '.join(changed)}); "
                f"delete it and the stages after it, or use another run_dir"
            )
        log(f"[{stage}] cached: {done}")
        return dict(done)
    log(f"[{stage}] running")
    folder.mkdir(parents=True, exist_ok=True)
    result = run(folder)
    atomic_write(done_file, json.dumps({**result, "settings": settings}, indent=2))
    return result
