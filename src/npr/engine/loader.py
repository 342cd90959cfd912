"""`load_engine(model, backend)`: one entry point for every decoding backend.

`hf` is our PyTorch engine on any Hugging Face causal LM (the reference for exactness); `llamacpp` decodes
the same layout on llama.cpp from a GGUF file, exported once from the model's folder into the model cache;
`vllm` decodes sequential mode on vLLM (see `npr.engine.vllm`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from npr.engine.core import DecodingEngine, ParallelEngine
from npr.engine.handle import Engine
from npr.engine.llamacpp import LlamaCppCache
from npr.engine.request import eos_ids as tokenizer_eos_ids
from npr.format import TAGS, TagIds

BACKENDS = ("hf", "llamacpp", "vllm")


class LlamaCppEngine(DecodingEngine):
    """The decoding loop on llama.cpp: our tokenizer and sampler, llama.cpp's cache and forward pass."""

    backend = "llamacpp"

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        tokenizer: Any,
        *,
        eos_ids: set[int] | None = None,
        max_batch_requests: int = 64,
        prefill_tokens: int = 4096,
        allow_prompt_tags: bool = False,
        **cache_options: Any,
    ):
        """`cache_options` go to `LlamaCppCache` (n_ctx, n_seq_max, n_threads, kv_type, flash_attn)."""
        cache = LlamaCppCache(gguf, **cache_options)
        check_vocabulary(cache, tokenizer)
        if eos_ids is None:
            eos_ids = tokenizer_eos_ids(tokenizer)
        super().__init__(
            tokenizer,
            cache,
            eos_ids,
            max_batch_requests=max_batch_requests,
            prefill_tokens=prefill_tokens,
            allow_prompt_tags=allow_prompt_tags,
        )


def check_vocabulary(cache: LlamaCppCache, tokenizer: Any) -> None:
    """Refuse a GGUF whose vocabulary is not the tokenizer's: same size bound, same tag ids, same tokens."""
    where = cache.path
    if len(tokenizer) > cache.n_vocab:
        raise ValueError(
            f"{where}: the GGUF vocabulary has {cache.n_vocab} tokens but the tokenizer has {len(tokenizer)}; "
            "export the GGUF from the same model folder (`npr export gguf`)"
        )
    tags = TagIds.from_tokenizer(tokenizer)
    for tag, token in zip(TAGS, tags.as_tuple(), strict=True):
        if cache.token_text(token) != tag:
            raise ValueError(
                f"{where}: tag {tag} is token {token} in the tokenizer, but the GGUF has "
                f"{cache.token_text(token)!r} there; export the GGUF from the same tagged model folder"
            )
    tag_set = set(tags.as_tuple())
    stride = max(1, len(tokenizer) // 512)  # a spread sample: byte tokens alone agree across vocabularies
    ordinary = [i for i in range(0, len(tokenizer), stride) if i not in tag_set]
    ours = tokenizer.convert_ids_to_tokens(ordinary)
    for token, text in zip(ordinary, ours, strict=True):
        if cache.token_text(token) != text:
            raise ValueError(
                f"{where}: token {token} is {text!r} in the tokenizer but {cache.token_text(token)!r} in the "
                "GGUF: they come from different vocabularies"
            )


def folder_eos_ids(folder: Path, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of a saved model: its tokenizer's and its generation config's, if it has one."""
    from transformers import GenerationConfig

    has_config = (folder / "generation_config.json").is_file()
    return tokenizer_eos_ids(tokenizer, GenerationConfig.from_pretrained(folder) if has_config else None)


def tagged_model_folder(model: str | os.PathLike[str]) -> Path:
    """A name, `.gguf`-converted name, run directory or folder → a model folder whose tokenizer has the tags
    (a checkpoint without them is tagged once into the model cache, as `load_model` would tag it)."""
    from transformers import AutoTokenizer

    from npr.hub import cache_dir
    from npr.model import TINY, load_any, resolve_model_source, save_model
    from npr.train.checkpoint import resolve_model_dir

    if str(model) == TINY:
        folder = cache_dir() / "tiny-seed0"
        if not (folder / "config.json").is_file():
            save_model(*load_any(TINY), folder)
        return folder
    folder = resolve_model_dir(resolve_model_source(model))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no model folder at {folder} (expected a Hugging Face folder with config.json)"
        )
    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    if all(tag in vocab for tag in TAGS):
        return folder
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]  # stable across processes
    tagged = cache_dir() / "tagged" / f"{folder.name}-{digest}"
    if not (tagged / "config.json").is_file():
        save_model(*load_any(folder), tagged)
    return tagged


def load_llamacpp(model: Any, *, tokenizer: Any = None, dtype: str = "f32", **options: Any) -> LlamaCppEngine:
    """A llama.cpp engine for a `.gguf` file (with `tokenizer=`), a model folder or name (exported once into
    the cache), or a loaded HF model with its `tokenizer=` (exported to a temporary file)."""
    from transformers import AutoTokenizer

    from npr.export import cached_gguf, export_gguf

    if isinstance(model, str | os.PathLike) and str(model).endswith(".gguf"):
        if tokenizer is None:
            raise ValueError(
                f"{model}: a .gguf file needs tokenizer= (the model folder it was exported from)"
            )
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        return LlamaCppEngine(model, tokenizer, **options)
    if isinstance(model, str | os.PathLike):
        folder = tagged_model_folder(model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return LlamaCppEngine(
            cached_gguf(folder, dtype), tokenizer, eos_ids=folder_eos_ids(folder, tokenizer), **options
        )
    if tokenizer is None:
        raise ValueError("a loaded model needs tokenizer= to build a llama.cpp engine")
    from npr.model import save_model

    with tempfile.TemporaryDirectory(prefix="npr-export-") as tmp:
        folder = save_model(model, tokenizer, Path(tmp) / "model")
        gguf = export_gguf(folder, Path(tmp) / "model.gguf", dtype)
        return LlamaCppEngine(gguf, tokenizer, eos_ids=folder_eos_ids(folder, tokenizer), **options)


def load_engine(model: Any, backend: str = "hf", *, tokenizer: Any = None, **options: Any) -> Engine:
    """An engine for `model` on `backend` (`hf`, `llamacpp` or `vllm`).

    `model` is a model folder, a run directory (its latest checkpoint), a named model, `tiny`, or a loaded
    Hugging Face model passed with its `tokenizer=`; `llamacpp` also takes a `.gguf` file (with
    `tokenizer=`). `options` go to the backend (e.g. `max_batch_requests`; llama.cpp: `n_ctx`,
    `n_seq_max`, `n_threads`, `kv_type`, `flash_attn`, `dtype` of the export).
    """
    if backend == "hf":
        if isinstance(model, str | os.PathLike):
            from npr.model import TINY, load_any
            from npr.train.checkpoint import resolve_model_dir

            model, tokenizer = load_any(model if str(model) == TINY else resolve_model_dir(Path(model)))
        elif tokenizer is None:
            raise ValueError("a loaded model needs tokenizer=")
        return ParallelEngine(model, tokenizer, **options)
    if backend == "llamacpp":
        return load_llamacpp(model, tokenizer=tokenizer, **options)
    if backend == "vllm":
        from npr.engine.vllm import load_vllm

        return load_vllm(model, tokenizer=tokenizer, **options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
