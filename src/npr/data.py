"""Datasets and prompts: JSONL files, reasoning-gym tasks, and the chat prompt that asks for the format.

Our prompt ids never contain tag ids (DESIGN §3): the instruction shows the tag strings as examples, so
message contents are tokenised with special tokens split into ordinary text, while the chat template's own
special tokens (``<|im_start|>`` …) stay special. The paper's official prompt (style ``official``, for its
released checkpoints) is tokenised as the paper did it, tag strings becoming tag ids; the layout takes any
prompt as opaque, so both work.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from npr.example import Example
from npr.format import TagIds
from npr.tasks import TASKS

__all__ = [
    "DataError",
    "Example",
    "build_prompt",
    "build_prompt_text",
    "encode_messages",
    "instruction",
    "load_dataset",
    "load_jsonl",
    "load_task",
    "user_content",
]

TASK_PREFIX = "task:"
DEFAULT_TASK_SIZE = 100
# A string no message or template contains: it marks where each message's content goes in the rendered chat.
_PLACEHOLDER = "NPR_MESSAGE_CONTENT_7f3a9c_"
_PLACEHOLDER_RE = re.compile(re.escape(_PLACEHOLDER) + r"(\d+):")


class DataError(ValueError):
    """Bad input data; the message names the file and line (or the task spec)."""


# ---- JSONL -------------------------------------------------------------------------------------------


def _text_field(record: dict[str, Any], name: str, where: str, *, numbers: bool) -> str:
    """A required string field; gold answers may also be numbers (written as strings)."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if numbers and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string or a number" if numbers else "a non-empty string"
        raise DataError(f"{where}: field {name!r} must be {kind}, got {value!r}")
    return value


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """`(line, "file:line", record)` for each non-blank line; bad JSON or a non-object names its line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield lineno, where, record


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
) -> list[Example]:
    """Read one example per line; other fields go to ``meta``. Blank lines are skipped.

    Ids come from ``id_field`` (unique) or default to ``"<file stem>:<line>"``.
    """
    examples: list[Example] = []
    seen: dict[str, int] = {}
    stem = Path(path).stem
    for lineno, where, record in iter_jsonl(path):
        question = _text_field(record, question_field, where, numbers=False)
        answer = _text_field(record, answer_field, where, numbers=True)
        ex_id = f"{stem}:{lineno}"
        if id_field is not None:
            ex_id = _text_field(record, id_field, where, numbers=True)
            if ex_id in seen:
                raise DataError(f"{where}: duplicate id {ex_id!r} (first on line {seen[ex_id]})")
            seen[ex_id] = lineno
        used = {question_field, answer_field, id_field}
        meta = {k: v for k, v in record.items() if k not in used}
        examples.append(Example(question=question, answer=answer, id=ex_id, meta=meta))
    return examples


# ---- reasoning-gym tasks -----------------------------------------------------------------------------


def load_task(name: str, n: int = DEFAULT_TASK_SIZE, seed: int = 0, **config: Any) -> list[Example]:
    """``n`` problems of the reasoning-gym task ``name``; the same seed gives the same problems.

    Extra keyword arguments go to the task's config (e.g. ``max_terms=3`` for ``chain_sum``).
    """
    if n < 1:
        raise DataError(f"task {name!r}: n must be >= 1, got {n}")
    if name in TASKS:
        try:
            return TASKS[name].make(n, seed, **config)
        except (TypeError, ValueError) as e:
            raise DataError(f"task {name!r} with config {config}: {e}") from e
    import reasoning_gym  # slow import (sympy); only task users pay for it

    try:
        dataset = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    except (ValueError, TypeError, AssertionError) as e:
        raise DataError(f"task {name!r} with config {config}: {e}") from e
    return [
        Example(
            question=entry["question"],
            answer=str(entry["answer"]),
            id=f"{name}:{seed}:{i}",
            meta={"task": name, **entry["metadata"]},
        )
        for i, entry in enumerate(dataset)
    ]


def _query_value(text: str) -> Any:
    """``3`` → 3, ``0.5`` → 0.5, ``true`` → True; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_dataset(spec: str | os.PathLike[str], **jsonl_options: Any) -> list[Example]:
    """A JSONL path, or ``task:NAME?n=50&seed=1&KEY=VALUE`` for a reasoning-gym task.

    ``jsonl_options`` (``question_field`` …) apply to files.

    >>> [e.answer for e in load_dataset("task:chain_sum?n=2&seed=1")] == [
    ...     e.answer for e in load_task("chain_sum", 2, seed=1)]
    True
    """
    spec = os.fspath(spec)
    if not spec.startswith(TASK_PREFIX):
        return load_jsonl(spec, **jsonl_options)
    name, _, query = spec.removeprefix(TASK_PREFIX).partition("?")
    if not name:
        raise DataError(f"{spec!r}: no task name (expected 'task:NAME?n=…&seed=…')")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise DataError(f"{spec!r}: {e} (expected 'task:NAME?n=…&seed=…&KEY=VALUE')") from None
    params = {k: _query_value(v) for k, v in pairs}
    n, seed = params.pop("n", DEFAULT_TASK_SIZE), params.pop("seed", 0)
    if not isinstance(n, int) or not isinstance(seed, int):
        raise DataError(f"{spec!r}: n and seed must be integers, got n={n!r}, seed={seed!r}")
    return load_task(name, n, seed, **params)


# ---- prompts -----------------------------------------------------------------------------------------


PromptStyle = Literal["full", "short", "official"]
PROMPT_STYLES: tuple[str, ...] = ("full", "short", "official")
"""`full` explains the format to a pretrained model; `short` is a few-token cue for models trained from
scratch (the demo), whose prompts would otherwise cost more compute than their answers; `official` is the
paper's own prompt, needed to run its released checkpoints as they were trained (see `build_prompt`)."""

_INSTRUCTION_FILES = {
    ("full", True): "format_instruction",
    ("full", False): "sequential_instruction",
    ("short", True): "format_instruction_short",
    ("short", False): "sequential_instruction_short",
}

OFFICIAL_PROMPTS_ENV = "NPR_OFFICIAL_PROMPTS"
"""Folder holding the paper's own instruction files, `npr.txt` (parallel) and `cot.txt` (sequential), as in
its release's `evals/prompts/`. npr does not ship that text (it is the authors'); point this variable at a
checkout of the release to evaluate its checkpoints exactly as they were trained."""
_OFFICIAL_FILES = {True: "npr.txt", False: "cot.txt"}

TemplateOptions = Mapping[str, Any]
"""Extra keyword arguments of the chat template, e.g. ``{"enable_thinking": False}`` for a Qwen3 model in
non-thinking mode (its template then closes an empty ``<think></think>`` in the prompt, not the answer)."""


def instruction(parallel: bool = True, style: PromptStyle = "full") -> str:
    """The format instruction (parallel) or the plain step-by-step one (sequential baselines)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "official":
        return _official_instruction(parallel, os.environ.get(OFFICIAL_PROMPTS_ENV, ""))
    name = _INSTRUCTION_FILES[style, parallel]
    return files("npr").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8").strip()


@cache
def _official_instruction(parallel: bool, folder: str) -> str:
    path = Path(folder) / _OFFICIAL_FILES[parallel]
    if not folder or not path.is_file():
        raise ValueError(
            f"the official prompt needs {OFFICIAL_PROMPTS_ENV} set to the folder of the paper's prompt files "
            f"({', '.join(_OFFICIAL_FILES.values())}; `evals/prompts/` in its release); "
            f"{'it is not set' if not folder else f'no {path}'}"
        )
    return path.read_text(encoding="utf-8").strip()


def user_content(question: str, *, parallel: bool = True, style: PromptStyle = "full") -> str:
    """The user turn: the question, a blank line, then the instruction (DESIGN §2)."""
    return f"{question.strip()}\n\n{instruction(parallel, style)}"


def _render_parts(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    template: TemplateOptions | None = None,
) -> list[tuple[str, bool]]:
    """The rendered chat as ``(text, is_message_content)`` pieces, in order.

    The template is rendered with a numbered placeholder as each message's content, so template logic that
    inspects a content sees the placeholder; each must come out exactly once.
    """
    for i, message in enumerate(messages):
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a string, got {message.get('content')!r}")
    masked = [{**m, "content": f"{_PLACEHOLDER}{i}:"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(
        masked, tokenize=False, add_generation_prompt=add_generation_prompt, **dict(template or {})
    )
    pieces = _PLACEHOLDER_RE.split(rendered)  # [template, index, template, index, …, template]
    order = [int(i) for i in pieces[1::2]]
    if sorted(order) != list(range(len(messages))):
        raise ValueError("the tokenizer's chat template must render every message's content exactly once")
    parts = [(pieces[0], False)]
    for index, template_text in zip(order, pieces[2::2], strict=True):
        parts += [(messages[index]["content"], True), (template_text, False)]
    return [(text, is_content) for text, is_content in parts if text]


def encode_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    template: TemplateOptions | None = None,
    tags_as_ids: bool = False,
) -> list[int]:
    """Chat messages → prompt ids: the template's own tokens stay special, message contents are plain text.

    Raises if a tag id still occurs (a template that writes tags itself): the layout would misread it.
    With ``tags_as_ids`` the chat is tokenised as the paper's release does it (the whole rendered text in one
    call, so tag strings in the contents become tag ids), and tag ids in the prompt are expected.
    """

    def encode(text: str, split: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])

    parts = _render_parts(tokenizer, messages, add_generation_prompt, template)
    if tags_as_ids:
        return encode("".join(text for text, _ in parts), False)
    ids = [i for text, is_content in parts for i in encode(text, is_content)]
    leaked = set(ids) & _tag_ids(tokenizer)
    if leaked:
        raise ValueError(f"prompt ids contain tag ids {sorted(leaked)}: check the chat template")
    return ids


def _tag_ids(tokenizer: Any) -> set[int]:
    try:
        return set(TagIds.from_tokenizer(tokenizer).as_tuple())
    except ValueError:  # a seed model before `add_tag_tokens` (stage 1): no tag id to leak
        return set()


def _question_turn(question: str, parallel: bool, style: PromptStyle) -> list[dict[str, str]]:
    return [{"role": "user", "content": user_content(question, parallel=parallel, style=style)}]


def build_prompt(
    tokenizer: Any,
    question: str,
    *,
    parallel: bool = True,
    style: PromptStyle = "full",
    template: TemplateOptions | None = None,
    tags_as_ids: bool | None = None,
) -> list[int]:
    """Prompt ids for a question: one user turn (no system prompt), then the assistant's turn opens.

    ``template`` goes to the chat template (``{"enable_thinking": False}`` …). ``tags_as_ids`` (default: only
    for the ``official`` style) tokenises the tag strings of the instruction into tag ids, as the paper's
    evaluation did: its checkpoints were trained on such prompts. Pass False for a checkpoint whose own
    tokenizer has no tag tokens (NPR-Zero): there the tags were ordinary text.
    """
    as_ids = style == "official" if tags_as_ids is None else tags_as_ids
    turn = _question_turn(question, parallel, style)
    return encode_messages(tokenizer, turn, template=template, tags_as_ids=as_ids)


def build_prompt_text(
    tokenizer: Any,
    question: str,
    *,
    parallel: bool = True,
    style: PromptStyle = "full",
    template: TemplateOptions | None = None,
) -> str:
    """The text that :func:`build_prompt` tokenises, for display (never re-tokenise it)."""
    turn = _question_turn(question, parallel, style)
    return "".join(text for text, _ in _render_parts(tokenizer, turn, True, template))
