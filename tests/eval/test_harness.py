"""`evaluate` and `npr eval` end to end on the tiny model: files written, metrics consistent with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import npr.cli.eval  # noqa: F401  (registers `npr eval` on the app)
from npr.cli import app
from npr.data import Example, load_dataset
from npr.engine import ParallelEngine, SamplingParams, load_rollouts
from npr.eval import compare, evaluate, load_summary
from npr.eval.harness import LatencyRun, check_run, solo_latencies
from npr.model import tiny_model
from tests.scripted import Script

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tiny_math.jsonl"
FILES = {"records.jsonl", "rollouts.jsonl", "summary.json", "summary.md", "plot.png"}
BASELINE_FILES = {"baseline_records.jsonl", "baseline_rollouts.jsonl"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run ~10× faster on one thread than fighting for two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine():
    return ParallelEngine(*tiny_model(seed=0))


@pytest.fixture(scope="module")
def scripted_run(engine, tmp_path_factory):
    """Two problems whose every sample forks into 2 branches and answers 5: right for the first only."""
    script = Script(engine.tokenizer, branch_lens=[[6, 4]], takeaway_len=6)
    params = SamplingParams(max_new_tokens=96, seed=0, logits_processors=[script])
    problems = [Example("What is 2 + 3?", "5", "a"), Example("What is 7 + 8?", "15", "b")]
    out = tmp_path_factory.mktemp("scripted")
    result = evaluate(
        engine, problems, k=2, params=params, baseline="sequential", progress=False, out_dir=out
    )
    return result, out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_writes_every_file(scripted_run):
    result, out = scripted_run
    assert {p.name for p in out.iterdir()} == FILES | BASELINE_FILES
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary()))
    assert summary["settings"]["params"]["n"] == 2
    assert "| this run (baseline) | sequential | 2 | 50.0% |" in (out / "summary.md").read_text()


def test_evaluate_scores_per_problem_and_measures_forks(scripted_run):
    result, out = scripted_run
    m = result.metrics
    assert (m.mode, m.problems, m.k) == ("parallel", 2, 2)
    assert (m.avg_at_k, m.pass_at, m.best_at_k) == (0.5, {1: 0.5, 2: 0.5}, 0.5)
    assert (m.parallel_rate, m.branches_per_fork, m.format_valid_rate) == (1.0, 2.0, 1.0)
    # the shorter branch of each answer (<step>, "2", ":", 4 free tokens, </step>) is off the critical path
    assert m.total_tokens - m.critical_path_tokens == 4 * 8
    assert m.ideal_speedup > 1.0
    records = read_jsonl(out / "records.jsonl")
    assert [(r["id"], r["gold"], r["correct"]) for r in records] == [("a", "5", 2), ("b", "15", 0)]
    assert {s["answer"] for r in records for s in r["samples"]} == {"5"}
    assert sum(s["total_tokens"] for r in records for s in r["samples"]) == m.total_tokens


def test_evaluate_baseline_runs_sequentially_with_the_same_settings(scripted_run):
    result, out = scripted_run
    rollouts, base = load_rollouts(out / "rollouts.jsonl"), load_rollouts(out / "baseline_rollouts.jsonl")
    assert [(r.index, r.sample, r.mode) for r in rollouts] == [
        (0, 0, "parallel"),
        (0, 1, "parallel"),
        (1, 0, "parallel"),
        (1, 1, "parallel"),
    ]
    assert {r.mode for r in base} == {"sequential"} and len(base) == 4
    b = result.baseline.metrics
    assert (b.parallel_rate, b.ideal_speedup, b.avg_at_k) == (0.0, 1.0, 0.5)
    assert result.speedup.tps == pytest.approx(result.metrics.tps / b.tps)
    assert result.speedup.latency == pytest.approx(b.latency_s / result.metrics.latency_s)


def test_evaluate_uses_a_task_verifier_and_writes_nothing_without_out_dir(engine):
    def always(text: str, example: Example) -> bool:
        return True

    problems = load_dataset(FIXTURE)[:1]
    result = evaluate(
        engine,
        problems,
        k=1,
        params=SamplingParams(max_new_tokens=4, seed=0),
        verifier=always,
        progress=False,
    )
    assert result.metrics.avg_at_k == 1.0 and result.out_dir is None
    assert result.settings["verifier"] == "always"
    assert result.baseline is None and result.speedup is None


@pytest.mark.parametrize(
    ("mode", "baseline", "k", "word"),
    [
        ("beam", None, 1, "mode"),
        ("parallel", "parallel", 1, "baseline"),
        ("sequential", "sequential", 1, "needs no"),
        ("parallel", None, 0, "k must"),
    ],
)
def test_bad_settings_fail_before_decoding(mode, baseline, k, word):
    with pytest.raises(ValueError, match=word):
        check_run(mode, baseline, k)


def test_evaluate_rejects_an_empty_dataset(engine):
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate(engine, [], k=1, progress=False)


def test_evaluate_leaves_the_engine_clean_when_a_prompt_fails(engine):
    problems = [Example("What is 2 + 3?", "5"), Example("2 + 3 = ? " * 2000, "5")]  # the second overflows
    with pytest.raises(ValueError, match="context"):
        evaluate(engine, problems, k=2, progress=False, warmup=False)
    assert not engine.has_work


def test_compare_puts_runs_side_by_side(scripted_run, tmp_path):
    _, out = scripted_run
    table = compare([out, out])
    lines = table.splitlines()
    assert lines[0].startswith("| run | mode | k | avg@k | pass@k | format-valid | parallel |")
    assert len(lines) == 2 + 4  # header, rule, then run + baseline per folder
    assert lines[2].startswith(f"| {out.name} | parallel | 2 | 50.0% | 50.0% | 100.0% | 100.0% |")
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        compare([tmp_path])
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="not an evaluation summary"):
        load_summary(tmp_path)


def test_cli_eval_end_to_end_then_compare(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["eval", "--model", "tiny", "--data", str(FIXTURE), "-k", "2", "--limit", "2", "--out", str(out)]
    args += ["--max-new-tokens", "8", "--baseline", "sequential", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == FILES | BASELINE_FILES
    assert "| this run | parallel | 2 |" in res.output
    summary = load_summary(out)
    info = {"model": "tiny", "backend": "hf", "prompt": "full", "data": str(FIXTURE), "limit": 2}
    assert summary["settings"]["info"] == info
    assert (summary["metrics"]["problems"], summary["settings"]["params"]["top_p"]) == (2, 0.7)
    assert len(read_jsonl(out / "records.jsonl")) == 2

    res = runner.invoke(app, ["eval", "--compare", str(out), str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("| run (baseline) | sequential |") == 2


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--model", "tiny"], "give --model and one of --data or --bench"),
        (["--model", "tiny", "--data", str(FIXTURE), "--bench", "paper"], "one of --data or --bench"),
        (
            ["--model", "tiny", "--data", str(FIXTURE), "--data-dir", "x"],
            "--data-dir and --protocol go with --bench",
        ),
        (["--model", "tiny", "--bench", "aime26"], "unknown bench 'aime26'"),
        (["--model", "tiny", "--bench", "paper", "--protocol", "fast"], "unknown protocol 'fast'"),
        (["--model", "tiny", "--data", str(FIXTURE), "--prompt", "long"], "--prompt must be one of"),
        (["--model", "tiny", "--data", str(FIXTURE), "--out", "x", "--mode", "beam"], "mode must be"),
        (["--model", "tiny", "--data", "nope.jsonl", "--out", "x"], "nope.jsonl"),
        (["--compare"], "give the result folders"),
        (["--compare", "no/such/dir"], "no summary.json"),
        (["somedir"], "only read with --compare"),
    ],
)
def test_cli_eval_user_errors(args, word):
    res = CliRunner().invoke(app, ["eval", *args])
    assert res.exit_code == 2
    assert word in " ".join(res.output.split())


def test_solo_latencies_time_each_problem_alone_for_each_run_and_leave_the_engines_empty(engine):
    problems = [Example("What is 2 + 3?", "5", "a"), Example("What is 7 + 8?", "15", "b")]
    params = SamplingParams(n=4, max_new_tokens=12, seed=0)  # n is ignored: one sample per problem
    runs = {"par": LatencyRun(engine, "parallel"), "seq": LatencyRun(engine, "sequential")}
    times = solo_latencies(runs, problems, params, repeats=2)
    assert set(times) == {"par", "seq"}
    assert all(len(t) == 2 and all(x > 0 for x in t) for t in times.values())
    assert not engine.has_work
