"""The paper's benchmarks: fixtures in each dataset's real schema load through the hub's code path and score
right answers right (written differently from the gold), wrong ones wrong; bad input is named precisely."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from npr.eval.bench import BENCHMARKS, PAPER, BenchError, load_bench, resolve_benches
from npr.rewards import accuracy_reward_batch

FIXTURES = Path(__file__).parent.parent / "fixtures" / "bench"

# Per benchmark, one response per fixture row, each writing the gold in another form.
RIGHT = {
    "aime24": [r"\boxed{33}", r"so $100x = \boxed{600}$.", r"\boxed{0401}"],
    "aime25": [r"\boxed{91}", r"\boxed{19.0}", r"\boxed{10}"],
    "hmmt25": [r"\boxed{-2, 1}", r"\boxed{4.5}", r"\boxed{\sqrt{12}}"],
    "amc23": [r"\boxed{27}", r"\boxed{\frac{3}{4}}", r"\boxed{8}"],
    "math500": [r"\boxed{\sqrt{50}}", r"\boxed{0.5}", r"\boxed{4}"],
    "olympiadbench": [r"\boxed{5}", r"\boxed{1}", r"\boxed{\dfrac{1}{2}}"],
    "minerva": [r"\boxed{20}", r"\boxed{\frac{7}{2}}", r"\boxed{0.0005}"],
    "zebralogic": [r"\boxed{A}", r"\boxed{\text{dog}}", r"\boxed{(C)}"],
}
WRONG = {
    "aime24": [r"\boxed{34}", r"\boxed{60}", "401 (not boxed)"],
    "aime25": [r"\boxed{92}", r"\boxed{20}", r"\boxed{}"],
    "hmmt25": [r"\boxed{1}", r"\boxed{9/4}", r"\boxed{2\sqrt{2}}"],
    "amc23": [r"\boxed{26}", r"\boxed{0.7}", r"\boxed{9}"],
    "math500": [r"\boxed{5\sqrt{3}}", r"\boxed{2}", r"\boxed{-4}"],
    "olympiadbench": [r"\boxed{6}", r"\boxed{-1}", r"\boxed{\frac{1}{3}}"],
    "minerva": [r"\boxed{40}", r"\boxed{3}", r"\boxed{0.005}"],
    "zebralogic": [r"\boxed{B}", r"\boxed{cat}", r"\boxed{green}"],
}


def test_paper_names_the_eight_benchmarks_with_their_k() -> None:
    names = [b.name for b in resolve_benches(PAPER)]
    assert names == list(RIGHT)
    assert {b.name for b in resolve_benches(PAPER) if b.k == 8} == {"aime24", "aime25", "hmmt25", "amc23"}
    assert [b.name for b in resolve_benches("math500, aime24,math500")] == ["math500", "aime24"]


@pytest.mark.parametrize("name", list(RIGHT))
def test_fixture_answers_score_right_and_wrong(name: str) -> None:
    bench = BENCHMARKS[name]
    examples = load_bench(name, FIXTURES)
    assert len(examples) == 3 and all(e.meta["bench"] == name for e in examples)
    right = accuracy_reward_batch(RIGHT[name], examples, check=bench.check)
    wrong = accuracy_reward_batch(WRONG[name], examples, check=bench.check)
    assert right == [1.0] * 3, right
    assert wrong == [-1.0] * 3, wrong


def _fake_datasets(calls: list[tuple]) -> types.ModuleType:
    """A stand-in `datasets` module that serves the fixture rows as the hub would."""

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict]:
        calls.append((path, name, split))
        bench = next(b for b in BENCHMARKS.values() if b.dataset == path)
        return [json.loads(line) for line in (FIXTURES / f"{bench.name}.jsonl").read_text().splitlines()]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("name", list(RIGHT))
def test_hub_and_folder_give_the_same_problems(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    bench = BENCHMARKS[name]
    hub, local = load_bench(name, limit=2), load_bench(name, FIXTURES, limit=2)
    assert calls == [(bench.dataset, bench.config, bench.split)]
    assert [(e.id, e.question, e.answer) for e in hub] == [(e.id, e.question, e.answer) for e in local]
    assert len(hub) == 2 and hub[0].meta["source"].startswith(bench.dataset)


def test_zebralogic_question_lists_lettered_choices() -> None:
    ex = load_bench("zebralogic", FIXTURES)[2]
    assert "Choices: A. red B. green C. blue" in ex.question and ex.answer == "C"
    assert ex.meta["choices"] == ["red", "green", "blue"]


def test_unknown_bench_lists_known_names() -> None:
    with pytest.raises(BenchError, match=r"unknown bench 'aime26'.*'paper'.*'aime24'.*'zebralogic'"):
        resolve_benches("aime24,aime26")


def test_missing_file_names_bench_and_file(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as e:
        load_bench("hmmt25", tmp_path)
    assert "bench hmmt25" in str(e.value) and str(tmp_path / "hmmt25.jsonl") in str(e.value)
    assert "MathArena/hmmt_feb_2025" in str(e.value)


def test_row_without_answer_names_bench_file_line_and_field(tmp_path: Path) -> None:
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": ""}]
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchError) as e:
        load_bench("math500", tmp_path)
    assert f"bench math500, {tmp_path / 'math500.jsonl'}:2: no answer in field 'answer'" in str(e.value)


def test_choice_answer_must_be_a_choice(tmp_path: Path) -> None:
    row = {"id": "x", "puzzle": "p", "question": "q", "choices": ["a", "b"], "answer": "c"}
    (tmp_path / "zebralogic.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(
        BenchError, match=r"bench zebralogic, .*:1: field 'answer' 'c' is not one of 'choices'"
    ):
        load_bench("zebralogic", tmp_path)


def test_hub_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(BenchError, match=r"bench aime25: .*math-ai/aime25.*pip install datasets.*--data-dir"):
        load_bench("aime25")


def test_parquet_without_a_reader_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "minerva.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(BenchError, match=r"bench minerva: reading .*minerva.parquet needs pyarrow or pandas"):
        load_bench("minerva", tmp_path)
