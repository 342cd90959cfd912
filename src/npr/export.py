"""Hugging Face folder → GGUF, through llama.cpp's own converter, so llama.cpp can decode our models.

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and the matching `gguf-py`) is vendored in
the llama-cpp-python sdist; `make llamacpp` copies it to `<venv>/share/npr/llama.cpp` (or point
`$NPR_LLAMACPP_CONVERTER` at a llama.cpp checkout). It runs in a subprocess: its imports and logging stay
out of ours, and a conversion that fails leaves nothing behind.

One change to its behaviour: a tokenizer whose pre-tokenizer it does not know (our test tokenizers) gets a
fallback name instead of an error. The engine feeds token ids and reads logits, so llama.cpp's tokenizer is
never used; the vocabulary and the tag ids are still checked against ours when an engine loads the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from npr.hub import cache_dir, exclusive

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER_ENV = "NPR_LLAMACPP_CONVERTER"
FALLBACK_PRE_TOKENIZER = "gpt-2"

_BOOTSTRAP = """
import runpy, sys
root, fallback = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + "/gguf-py"]  # the converter's own gguf-py, not an installed gguf
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[3:]]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return fallback
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter_dir() -> Path:
    """Where `convert_hf_to_gguf.py` lives: `$NPR_LLAMACPP_CONVERTER`, else `<venv>/share/npr/llama.cpp`."""
    root = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "npr" / "llama.cpp")
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {root}: install the llama.cpp backend with `make llamacpp`, "
            f"or set {CONVERTER_ENV} to a llama.cpp source folder"
        )
    return root


def export_gguf(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "f32") -> Path:
    """Convert a Hugging Face model folder (weights, config, tokenizer with the tags) into `out` (atomic)."""
    source, target = Path(model_dir), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a Hugging Face model folder (no config.json)")
    root = converter_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    command = [sys.executable, "-c", _BOOTSTRAP, str(root), FALLBACK_PRE_TOKENIZER, str(source)]
    command += ["--outfile", tmp, "--outtype", dtype]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""}
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"converting {source} to GGUF failed:\n{tail}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _content_hash(folder: Path) -> str:
    """What a cached export depends on: the folder's weights, config and tokenizer files."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_gguf(model_dir: str | os.PathLike[str], dtype: str = "f32") -> Path:
    """The GGUF export of `model_dir` in the model cache, exported once (locked) and reused while the
    folder's files are unchanged."""
    folder = Path(model_dir).resolve()
    target = cache_dir() / "gguf" / f"{folder.name}-{_content_hash(folder)}-{dtype}.gguf"
    if target.is_file():
        return target
    with exclusive(target):
        if not target.is_file():  # another process may have exported it while we waited
            log.info("exporting %s once into %s", folder, target)
            export_gguf(folder, target, dtype)
    return target
