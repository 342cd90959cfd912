"""The paper's eight benchmarks by name: where each lives on the dataset hub, its fields, checker and k.

A benchmark's rows come either from the hub, through the `datasets` library (not a dependency of npr: it is
imported only then), or from a folder (`data_dir/<name>.jsonl` or `.parquet`, in the dataset's own field
names). Both feed the same row → `Example` conversion, so a fixture folder tests the hub path's code.

>>> [b.name for b in resolve_benches("paper")][:3]
['aime24', 'aime25', 'hmmt25']
>>> BENCHMARKS["hmmt25"].k, BENCHMARKS["math500"].k
(8, 1)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npr.data import DataError, iter_jsonl
from npr.eval.checkers import checker
from npr.example import Example
from npr.rewards import AnswerCheck

PAPER = "paper"
"""The name of the whole suite (all eight benchmarks)."""

Row = Mapping[str, Any]


class BenchError(DataError):
    """A benchmark that cannot be loaded: the message names the bench, the file (or dataset) and the field."""


def _question(field_name: str) -> Callable[[Row], str]:
    return lambda row: row[field_name]


def _zebra_question(row: Row) -> str:
    """A ZebraLogic puzzle as a multiple-choice question, laid out as in the paper's evaluation."""
    choices = " ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(row["choices"]))
    return f"Puzzle: {row['puzzle']}\n\nQuestion: {row['question']}\n\nChoices: {choices}\n\nAnswer:"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its hub dataset (id, config, split), its fields, its checker and its default k."""

    name: str
    title: str  # column name in the tables, as the paper writes it
    dataset: str
    split: str
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]  # the gold is the first of these that a row has
    checker_name: str = "math"
    k: int = 1  # avg@k of the paper
    config: str | None = None
    id_field: str | None = None
    question: Callable[[Row], str] | None = field(default=None, compare=False)

    @property
    def check(self) -> AnswerCheck | None:
        """The answer check (None: the default math-verify check)."""
        return checker(self.checker_name)

    @property
    def source(self) -> str:
        """`id` or `id (config)`, with the split: what `datasets.load_dataset` is given."""
        config = f", config {self.config}" if self.config else ""
        return f"{self.dataset}{config}, split {self.split}"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", "AIME24", "HuggingFaceH4/aime_2024", "train", ("problem",), ("answer",), k=8,
                  id_field="id"),
        Benchmark("aime25", "AIME25", "math-ai/aime25", "test", ("problem",), ("answer",), k=8, id_field="id"),
        Benchmark("hmmt25", "HMMT25", "MathArena/hmmt_feb_2025", "train", ("problem",), ("answer",), "hmmt",
                  k=8, id_field="problem_idx"),
        Benchmark("amc23", "AMC23", "math-ai/amc23", "test", ("question",), ("answer",), k=8, id_field="id"),
        Benchmark("math500", "MATH500", "HuggingFaceH4/MATH-500", "test", ("problem",), ("answer",),
                  id_field="unique_id"),
        Benchmark("olympiadbench", "OlympiadBench", "Hothan/OlympiadBench", "train", ("question",),
                  ("final_answer",), config="OE_TO_maths_en_COMP", id_field="id"),
        Benchmark("minerva", "Minerva", "math-ai/minervamath", "test", ("question",), ("answer",)),
        Benchmark("zebralogic", "ZebraLogic", "WildEval/ZebraLogic", "test", ("puzzle", "question", "choices"),
                  ("answer",), "choice", config="mc_mode", id_field="id", question=_zebra_question),
    )
}  # fmt: skip
"""The paper's benchmarks in table order. HMMT25 is the February 2025 competition."""


def resolve_benches(spec: str) -> list[Benchmark]:
    """`aime24,math500` or `paper` (all eight) → benchmarks; the error lists the known names."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise BenchError(f"--bench {spec!r}: no benchmark named (known: {[PAPER, *BENCHMARKS]})")
    out: list[Benchmark] = []
    for name in names:
        if name != PAPER and name not in BENCHMARKS:
            raise BenchError(f"unknown bench {name!r} (known: {[PAPER, *BENCHMARKS]})")
        for b in BENCHMARKS.values() if name == PAPER else [BENCHMARKS[name]]:
            if b not in out:
                out.append(b)
    return out


# ---- rows ------------------------------------------------------------------------------------------------


def _gold(value: Any) -> str | None:
    """A gold answer as text: a string, a number (7.0 → "7") or a list of them (joined by ", ")."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, list | tuple) and value:
        items = [_gold(v) for v in value]
        return ", ".join(i for i in items if i) if all(items) else None
    return None


def _to_example(bench: Benchmark, row: Row, where: str, index: int) -> Example:
    """One row → an `Example`; a missing field is named with the bench and the place of the row."""
    for name in bench.question_fields:
        if not row.get(name):
            raise BenchError(f"bench {bench.name}, {where}: missing field {name!r} (fields: {sorted(row)})")
    question = (bench.question or _question(bench.question_fields[0]))(row)
    answer = next((a for a in (_gold(row.get(f)) for f in bench.answer_fields) if a), None)
    if answer is None:
        raise BenchError(
            f"bench {bench.name}, {where}: no answer in field {' or '.join(map(repr, bench.answer_fields))} "
            f"(fields: {sorted(row)})"
        )
    meta: dict[str, Any] = {"bench": bench.name, "source": where}
    if bench.checker_name == "choice":  # the gold is the letter of the right choice
        choices = [str(c).strip() for c in row["choices"]]
        if answer not in choices:
            raise BenchError(
                f"bench {bench.name}, {where}: field 'answer' {answer!r} is not one of 'choices'"
            )
        answer, meta["choices"] = chr(65 + choices.index(answer)), choices
    raw_id = row.get(bench.id_field) if bench.id_field else None
    return Example(question=question, answer=answer, id=f"{bench.name}:{raw_id or index}", meta=meta)


def _file_rows(bench: Benchmark, data_dir: Path) -> Iterator[tuple[str, Row]]:
    """`(where, row)` from `data_dir/<name>.jsonl` or `.parquet`."""
    jsonl, parquet = data_dir / f"{bench.name}.jsonl", data_dir / f"{bench.name}.parquet"
    if jsonl.is_file():
        return ((where, record) for _, where, record in iter_jsonl(jsonl))
    if parquet.is_file():
        return ((f"{parquet} row {i}", row) for i, row in enumerate(_parquet_records(bench, parquet)))
    raise BenchError(
        f"bench {bench.name}: no file {jsonl} or {parquet} (the rows of {bench.source}, "
        f"with fields {[*bench.question_fields, *bench.answer_fields]})"
    )


def _parquet_records(bench: Benchmark, path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise BenchError(
                f"bench {bench.name}: reading {path} needs pyarrow or pandas (`pip install pyarrow`), "
                f"or give the rows as {bench.name}.jsonl"
            ) from None
        return [dict(r) for r in pd.read_parquet(path).to_dict("records")]
    return list(pq.read_table(path).to_pylist())


def _hub_rows(bench: Benchmark) -> Iterator[tuple[str, Row]]:
    """`(where, row)` from the dataset hub, through the `datasets` library (imported only here)."""
    try:
        import datasets
    except ImportError:
        raise BenchError(
            f"bench {bench.name}: loading {bench.source} from the hub needs the `datasets` library "
            f"(`pip install datasets`); offline, pass --data-dir DIR holding {bench.name}.jsonl or .parquet"
        ) from None
    try:
        rows = datasets.load_dataset(bench.dataset, name=bench.config, split=bench.split)
    except Exception as e:  # datasets raises many kinds (network, missing config, auth)
        raise BenchError(
            f"bench {bench.name}: could not load {bench.source} from the hub ({type(e).__name__}: {e}); "
            f"offline, pass --data-dir DIR holding {bench.name}.jsonl or .parquet"
        ) from e
    return ((f"{bench.dataset} [{bench.split}] row {i}", dict(row)) for i, row in enumerate(rows))


def load_bench(
    bench: str | Benchmark, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[Example]:
    """A benchmark's problems (the first `limit`), from `data_dir` if given, else from the hub."""
    b = bench if isinstance(bench, Benchmark) else resolve_benches(bench)[0]
    rows: Iterable[tuple[str, Row]] = _file_rows(b, Path(data_dir)) if data_dir is not None else _hub_rows(b)
    examples = []
    for i, (where, row) in enumerate(rows):
        if limit is not None and i >= limit:
            break
        examples.append(_to_example(b, row, where, i))
    if not examples:
        raise BenchError(f"bench {b.name}: no rows in {data_dir or b.source}")
    return examples
