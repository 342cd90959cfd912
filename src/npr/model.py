"""Models: the tag tokens, the tiny random test model, and atomic save/load of Hugging Face folders."""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import uuid
from importlib.resources import files
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from npr.format import TAGS, TagIds

# sdpa takes our additive float 4D mask as is (tests/test_model.py checks it against the causal default).
ATTN_IMPLEMENTATION = "sdpa"

PAD_TOKEN, TURN_START, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen-style turns; no system prompt is added (DESIGN §2), but a system message given by the caller renders.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Target BPE size for the tiny tokenizer; the built-in corpus saturates just below it (~1000 tokens).
TINY_BPE_VOCAB = 1024


# ---------------------------------------------------------------------------------------------- tag tokens


def tag_word(tag: str) -> str:
    """The text whose sub-token embeddings seed a tag's row.

    Closing tags keep their "/": with the bare word, `<step>` and `</step>` would start with equal rows, and a
    tied head could not prefer one over the other until training separates them.

    >>> tag_word("<plan>"), tag_word("</plan>")
    ('plan', '/plan')
    """
    return tag.strip("<>")


def _register_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> None:
    """Add `tokens` as extra special tokens, keeping the ones already there (argument names differ in 4.x/5.x)."""
    added = [AddedToken(t, special=True, normalized=False) for t in tokens]
    if "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters:
        key = "extra_special_tokens"
    else:  # transformers 4.x
        key = "additional_special_tokens"
    tokenizer.add_special_tokens({key: added}, **{f"replace_{key}": False})


def _embedding_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    """The input embedding matrix, plus the LM head's when it is a separate (untied) tensor; each [V, H]."""
    embed = cast(torch.nn.Embedding, model.get_input_embeddings()).weight
    head = model.get_output_embeddings()
    if head is None or cast(torch.nn.Linear, head).weight.data_ptr() == embed.data_ptr():
        return [embed]
    return [embed, cast(torch.nn.Linear, head).weight]


@torch.no_grad()
def _init_rows_to_subtoken_mean(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tags: list[tuple[str, int]]
) -> None:
    """Set each (tag, id) row of every embedding matrix to the mean of the rows of the tag word's sub-tokens."""
    matrices = _embedding_matrices(model)
    for tag, tag_id in tags:
        sub_ids = tokenizer(tag_word(tag), add_special_tokens=False)["input_ids"]
        for weight in matrices:
            weight[tag_id] = weight[sub_ids].mean(dim=0)


def add_tag_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> TagIds:
    """Make the 8 format tags single special tokens of `tokenizer` with rows in `model` (DESIGN §3).

    Idempotent: tags already in the tokenizer are kept with their ids and rows. The embedding matrix grows only
    when the tokenizer outgrows it (real checkpoints often have spare rows, which the tags then use). A tag
    row is (re)initialised to the mean of its word's sub-token rows when the tag is new to the tokenizer or
    its row did not exist before; for an untied LM head the same is done to the head's rows.
    """
    missing = [t for t in TAGS if t not in tokenizer.get_vocab()]
    if missing:
        _register_special_tokens(tokenizer, missing)
    n_rows = _embedding_matrices(model)[0].shape[0]
    if len(tokenizer) > n_rows:
        # mean_resizing samples from the global RNG and is overwritten for tags anyway.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tag_ids = TagIds.from_tokenizer(tokenizer)
    fresh = [(t, i) for t, i in zip(TAGS, tag_ids.as_tuple(), strict=True) if t in missing or i >= n_rows]
    _init_rows_to_subtoken_mean(model, tokenizer, fresh)
    return tag_ids


# ---------------------------------------------------------------------------------------------- tiny model


def train_tiny_tokenizer(vocab_size: int = TINY_BPE_VOCAB) -> Tokenizer:
    """Train a byte-level BPE on the built-in corpus (~15 ms); digits are split so numbers tokenise per digit.

    The three chat special tokens get ids 0, 1, 2; the tags are added later by `add_tag_tokens`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, TURN_START, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, whatever the corpus lacks
        show_progress=False,
    )
    corpus = files("npr").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(), trainer)
    return tokenizer


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    # Cached as JSON, not as an object: every caller gets its own tokenizer to add tags to.
    return train_tiny_tokenizer(vocab_size).to_str()


def _tiny_hf_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(TINY_BPE_VOCAB)),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    # Registered as special, as in Qwen, so decode(skip_special_tokens=True) drops it like the other two.
    _register_special_tokens(tokenizer, [TURN_START])
    return tokenizer


def tiny_model(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    **config_overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random float32 Qwen3 in eval mode and its locally trained tokenizer, tags included; seed fixes weights.

    `vocab_size` is the number of embedding rows (None: exactly the tokenizer's size, tags included); a larger
    value leaves spare rows as real checkpoints do. `intermediate_size` defaults to 3 × hidden. Extra keyword
    arguments go to `Qwen3Config`. The global torch RNG is left untouched.

    >>> model, tokenizer = tiny_model(seed=0)
    >>> tokenizer.convert_ids_to_tokens(tokenizer("<step>1: 2+3=5</step>")["input_ids"])
    ['<step>', '1', ':', 'Ġ', '2', '+', '3', '=', '5', '</step>']
    >>> model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    True
    """
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"tiny_model needs hidden_size % num_attention_heads == 0 and num_attention_heads % "
            f"num_key_value_heads == 0, got {hidden_size}, {num_attention_heads}, {num_key_value_heads}"
        )
    tokenizer = _tiny_hf_tokenizer()
    n_tokens = len(tokenizer)
    if vocab_size is not None and vocab_size < n_tokens:
        raise ValueError(
            f"tiny_model vocab_size must be >= {n_tokens} (the tokenizer's size), got {vocab_size}"
        )
    config = Qwen3Config(
        vocab_size=vocab_size or n_tokens,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        intermediate_size=intermediate_size or 3 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **config_overrides,
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).float()  # float32 even under another default dtype
        add_tag_tokens(model, tokenizer)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- save / load

TINY = "tiny"
"""The name `load_any` (and every `--model` option) gives the random test model."""


def resolve_model_source(name_or_path: str | os.PathLike[str]) -> Path:
    """The Hugging Face folder for a named model (`npr.hub.NAMED_MODELS`), a `.gguf` file (converted once
    into a cache folder by `npr.hub`) or a path.

    >>> resolve_model_source("runs/sft/final")
    PosixPath('runs/sft/final')
    """
    from npr import hub  # imported here: hub builds on this module

    resolver = hub.NAMED_MODELS.get(str(name_or_path))
    if resolver is not None:
        return resolver()
    path = Path(name_or_path).expanduser()
    return hub.gguf_folder(path) if path.suffix.lower() == ".gguf" else path


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike[str]
) -> Path:
    """`save_pretrained` model and tokenizer into `path`, atomically: never a half-written folder at `path`.

    Both are written to a hidden sibling folder first, which then takes `path`'s place. An existing `path`
    is replaced only if it is an empty folder or a model folder. If the process dies between moving the old
    folder aside and moving the new one in, the old one is left complete as `.NAME.old-*`.
    """
    target = Path(path)
    if target.exists() and not (target.is_dir() and (_is_model_folder(target) or not any(target.iterdir()))):
        raise FileExistsError(
            f"save_model: {target} exists and is not a model folder; refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return target


def load_model(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a Hugging Face folder (or a name in `npr.hub.NAMED_MODELS`).

    A seed checkpoint without the tag tokens gets them here through `add_tag_tokens` (the folder on disk is
    not changed), so every loaded pair has the 8 tags as single tokens.
    """
    from npr.hub import NAMED_MODELS

    source = resolve_model_source(path)
    if not source.is_dir():
        raise FileNotFoundError(
            f"load_model: no model folder at {source} (known names: {sorted(NAMED_MODELS)})"
        )
    if not _is_model_folder(source):
        raise FileNotFoundError(
            f"load_model: {source} is not a Hugging Face model folder (no config.json); "
            "expected a folder written by save_model or save_pretrained"
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    tokenizer = AutoTokenizer.from_pretrained(source)
    add_tag_tokens(model, tokenizer)
    cast(torch.nn.Module, model).to(device)  # in place; PreTrainedModel.to's wrapper confuses type checkers
    return model.eval(), tokenizer


def load_any(model: str | os.PathLike[str]) -> tuple[Any, Any]:
    """`load_model`, or the random test model for the name `tiny` (handy for smoke runs)."""
    return tiny_model(seed=0) if str(model) == TINY else load_model(model)
