"""`npr eval --bench paper --data-dir tests/fixtures/bench --model tiny --limit 2` writes the paper-shaped
tables (accuracy, parallel rate, efficiency with the speedup over a sequential run), and `--compare` lays
suites side by side. Small budget, one sample and the short prompt keep it quick."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from npr.cli import app
from npr.eval.bench import BENCHMARKS
from npr.eval.protocol import PAPER_MAX_NEW_TOKENS, get_protocol
from npr.eval.report import load_summary

FIXTURES = Path(__file__).parent.parent / "fixtures" / "bench"
TITLES = [b.title for b in BENCHMARKS.values()]


def test_paper_protocol_is_the_papers() -> None:
    p = get_protocol("paper")
    assert (p.temperature, p.top_p, p.mode, p.k) == (1.0, 0.7, "parallel", None)
    assert p.max_new_tokens == PAPER_MAX_NEW_TOKENS == 40_000
    assert [p.k_for(b) for b in BENCHMARKS.values()] == [8, 8, 8, 8, 1, 1, 1, 1]
    assert p.params(BENCHMARKS["hmmt25"], seed=3).n == 8


def test_bench_paper_writes_the_tables_then_compares(tmp_path: Path) -> None:
    out = tmp_path / "npr-tiny"
    args = ["eval", "--bench", "paper", "--data-dir", str(FIXTURES), "--model", "tiny", "--limit", "2"]
    args += ["--out", str(out), "--max-new-tokens", "4", "-k", "1", "--prompt", "short", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {"summary.json", "summary.md", "plot.png", *BENCHMARKS} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "suite" and list(summary["benches"]) == list(BENCHMARKS)
    assert summary["protocol"]["max_new_tokens"] == 4 and summary["protocol"]["top_p"] == 0.7
    for name, run in summary["benches"].items():
        assert run["metrics"]["problems"] == 2 and run["baseline"]["mode"] == "sequential"
        assert run["speedup"]["tps"] > 0 and run["settings"]["info"]["bench"] == name
        assert load_summary(out / name)["metrics"]["k"] == 1
    assert set(summary["average"]) == {"avg_at_k", "parallel_rate", "format_valid_rate", "speedup_tps"}
    page = (out / "summary.md").read_text()
    assert "| run | " + " | ".join(TITLES) + " | Avg. |" in page
    assert page.count("| this run |") == 2 + len(BENCHMARKS)  # accuracy, parallel rate, efficiency rows
    assert "| this run (sequential) |" in page and "## Parallel rate (%)" in page

    other = tmp_path / "other-run"
    shutil.copytree(out, other)
    res = CliRunner().invoke(app, ["eval", "--compare", str(out), str(other)])
    assert res.exit_code == 0, res.output
    assert "| npr-tiny |" in res.output and "| other-run | HMMT25 |" in res.output
    res = CliRunner().invoke(app, ["eval", "--compare", str(out), str(out / "aime24")])
    assert res.exit_code == 2 and "cannot compare benchmark suites" in " ".join(res.output.split())
