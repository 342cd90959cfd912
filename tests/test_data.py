"""JSONL loading, reasoning-gym tasks, dataset specs and the prompt builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from npr.data import (
    DataError,
    Example,
    build_prompt,
    build_prompt_text,
    encode_messages,
    instruction,
    load_dataset,
    load_jsonl,
    load_task,
    user_content,
)
from npr.format import TAGS, TagIds, check, contains_tag
from npr.model import CHAT_TEMPLATE, tiny_model, train_tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_math.jsonl"


def write_lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- JSONL -------------------------------------------------------------------------------------------


def test_fixture_loads() -> None:
    examples = load_jsonl(FIXTURE)
    assert len(examples) == 20
    assert examples[0] == Example(question="What is 2 + 3?", answer="5", id="tiny_math:1", meta={})
    assert len({e.id for e in examples}) == 20


def test_field_mapping_ids_meta_and_numeric_answers(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        json.dumps({"problem": "1+1?", "solution": 2, "uid": "a", "level": 1}),
        "",
        json.dumps({"problem": "half?", "solution": 0.5, "uid": 7}),
    )
    examples = load_jsonl(path, question_field="problem", answer_field="solution", id_field="uid")
    assert [(e.question, e.answer, e.id, e.meta) for e in examples] == [
        ("1+1?", "2", "a", {"level": 1}),
        ("half?", "0.5", "7", {}),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ('["q", "a"]', "expected a JSON object, got list"),
        ('{"question": "q"}', "missing field 'answer'"),
        ('{"question": "", "answer": "1"}', "field 'question' must be a non-empty string"),
        ('{"question": "q", "answer": [1, 2]}', "field 'answer' must be a non-empty string or a number"),
        ('{"question": "q", "answer": true}', "field 'answer' must be"),
        ('{"question": "q", "answer": NaN}', "field 'answer' must be"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    good = json.dumps({"question": "q", "answer": "1"})
    path = write_lines(tmp_path, good, "", bad_line, good)
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    row = json.dumps({"question": "q", "answer": "1", "id": "x"})
    path = write_lines(tmp_path, row, row)
    with pytest.raises(DataError, match=r":2: duplicate id 'x' \(first on line 1\)"):
        load_jsonl(path, id_field="id")


# ---- reasoning-gym tasks and specs -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "gsm_symbolic"])
def test_tasks_are_deterministic_by_seed(name: str) -> None:
    first, again, other = load_task(name, 5, seed=1), load_task(name, 5, seed=1), load_task(name, 5, seed=2)
    assert first == again
    assert [e.question for e in first] != [e.question for e in other]
    assert all(isinstance(e.answer, str) and e.answer for e in first)
    assert [e.id for e in first] == [f"{name}:1:{i}" for i in range(5)]
    assert all(e.meta["task"] == name for e in first)


def test_task_spec_passes_config_through() -> None:
    examples = load_dataset("task:chain_sum?n=4&seed=3&min_terms=2&max_terms=2")
    assert examples == load_task("chain_sum", 4, seed=3, min_terms=2, max_terms=2)
    assert all(e.meta["num_terms"] == 2 for e in examples)


def test_file_spec_loads_jsonl() -> None:
    assert load_dataset(str(FIXTURE)) == load_jsonl(FIXTURE)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("task:no_such_task?n=2", "no_such_task"),
        ("task:chain_sum?n=0", "n must be >= 1"),
        ("task:chain_sum?n=two", "n and seed must be integers"),
        ("task:chain_sum?n=2&colour=red", "colour"),
        ("task:?n=2", "no task name"),
        ("task:chain_sum?n", "bad query field"),
    ],
)
def test_bad_task_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


# ---- prompts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model(seed=0)[1]


def test_instruction_texts() -> None:
    parallel, sequential = instruction(parallel=True), instruction(parallel=False)
    assert all(tag in parallel for tag in TAGS) and "\\boxed{}" in parallel
    assert not contains_tag(sequential) and "\\boxed{}" in sequential
    example = parallel.splitlines()[-1]  # the worked example the model is shown must itself be perfect
    assert check(example).penalty == 0.0
    assert user_content("  What is 2+2? ") == "What is 2+2?\n\n" + parallel


@pytest.mark.parametrize("parallel", [True, False])
def test_prompt_ids_hold_no_tag_ids(tokenizer, parallel: bool) -> None:
    question = "Is <step> a tag? Compute 2 + 2."  # tags in the question stay text too
    ids = build_prompt(tokenizer, question, parallel=parallel)
    assert not set(ids) & set(TagIds.from_tokenizer(tokenizer).as_tuple())
    assert tokenizer.decode(ids) == build_prompt_text(tokenizer, question, parallel=parallel)
    turn_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == turn_start and ids.count(turn_start) == 2  # the template's own tokens stay special
    assert build_prompt_text(tokenizer, question, parallel=parallel) == tokenizer.apply_chat_template(
        [{"role": "user", "content": user_content(question, parallel=parallel)}],
        tokenize=False,
        add_generation_prompt=True,
    )


def test_seed_tokenizer_without_tags_builds_the_same_text(tokenizer) -> None:
    """Stage 1 prompts a seed model before tags are added: same text, tags spelled as ordinary sub-tokens."""
    seed = PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(), chat_template=CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="lacks tag tokens"):
        TagIds.from_tokenizer(seed)
    ids = build_prompt(seed, "2 + 2?")
    assert seed.decode(ids) == build_prompt_text(tokenizer, "2 + 2?")


def test_plain_tokenisation_would_leak_tag_ids(tokenizer) -> None:
    """Why the builder splits the user content: encoded normally, the instruction yields tag ids."""
    text = build_prompt_text(tokenizer, "2 + 2?")
    leaked = set(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert leaked & set(TagIds.from_tokenizer(tokenizer).as_tuple())


def with_template(tokenizer, template: str):
    """A copy of the tokenizer with another chat template (the shared fixture stays untouched)."""
    return tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, chat_template=template)


def test_template_that_writes_tags_is_refused(tokenizer) -> None:
    own = with_template(tokenizer, "{{- '<guideline>' -}}" + CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="prompt ids contain tag ids"):
        build_prompt(own, "2 + 2?")


@pytest.mark.parametrize(
    "template",
    [
        "{{- 'no content here' -}}",
        "{%- for m in messages -%}{{- m['content'] + m['content'] -}}{%- endfor -%}",
        "{{- messages[-1]['content'] -}}",
    ],
)
def test_template_must_render_each_content_once(tokenizer, template: str) -> None:
    own = with_template(tokenizer, template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    with pytest.raises(ValueError, match="every message's content exactly once"):
        encode_messages(own, messages)


def test_chat_messages_keep_tags_as_text(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Use <plan> tags."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "<guideline><plan>1: add</plan></guideline>"},
        {"role": "user", "content": "And 2 + 2?"},
    ]
    ids = encode_messages(tokenizer, messages)
    assert not set(ids) & set(TagIds.from_tokenizer(tokenizer).as_tuple())
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5
    with pytest.raises(ValueError, match="message 1: content must be a string"):
        encode_messages(tokenizer, [messages[0], {"role": "user", "content": [{"type": "text"}]}])
