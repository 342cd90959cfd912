"""Rejection sampling: the first good sample is kept, problems without one are dropped, kills resume exactly."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import npr.cli.sample  # noqa: F401  registers `npr sample`
from npr.cli import app
from npr.data import Example, build_prompt
from npr.engine import FinishReason, ParallelEngine, SamplingParams
from npr.format import check
from npr.model import tiny_model
from npr.train import rejection
from npr.train.rejection import load_stats, problem_seed, rejection_sample, stats_path_for
from tests.scripted import Script

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
K = 4
# Gold 5 can be hit (the coin below writes 5 or 7); gold 9 never: those problems must be dropped.
PROBLEMS = [Example(f"What is {i} + {5 - i}?", "9" if i == 3 else "5", id=f"p{i}") for i in range(6)]


class Coin:
    """A well-formed script whose boxed answer is a fair coin between 5 and 7.

    Free tokens in steps and takeaway are the random model's, so some samples come out too short
    (format penalty -0.4): samples differ in both correctness and format.
    """

    def __init__(self, tokenizer):
        self.script = Script(tokenizer, [[4, 4]], takeaway_len=4, final_len=1)
        self.five, self.seven = (tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in "57")

    def __call__(self, visible, logits):
        out = self.script(visible, logits)
        if out[self.five] == 0 and bool(torch.isinf(out).sum() == len(out) - 1):  # forcing the answer
            out[self.seven] = 0.0
        return out


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = tiny_model(seed=0)
    return ParallelEngine(model, tokenizer)


def _params(engine) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_new_tokens=120, logits_processors=[Coin(engine.tokenizer)])


def _run(engine, out, **kw):
    return rejection_sample(engine, PROBLEMS, out, k=K, params=_params(engine), problems_per_batch=2, **kw)


@pytest.fixture(scope="module")
def unbroken(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken") / "samples.jsonl"
    return out, _run(engine, out)


@pytest.fixture(scope="module")
def expected(engine):
    """Per problem, the samples rejection sampling must draw: the same seeds, decoded here in one batch."""
    groups = [
        engine.add_request(
            build_prompt(engine.tokenizer, ex.question),
            SamplingParams(
                n=K,
                seed=problem_seed(0, i, K),
                max_new_tokens=120,
                logits_processors=[Coin(engine.tokenizer)],
            ),
            "sequential",
        )
        for i, ex in enumerate(PROBLEMS)
    ]
    while engine.has_work:
        engine.step()
    return [[engine.rollout(r) for r in group] for group in groups]


def _good(rollout, example) -> bool:
    return (
        rollout.finish_reason == FinishReason.STOP
        and check(rollout.text).penalty == 0.0
        and rollout.answer == example.answer
    )


def test_first_good_sample_is_kept_and_problems_without_one_dropped(unbroken, expected):
    out, stats = unbroken
    firsts = [
        next((j for j, r in enumerate(rs) if _good(r, ex)), None)
        for rs, ex in zip(expected, PROBLEMS, strict=True)
    ]
    assert 0 in firsts and None in firsts and any(j not in (0, None) for j in firsts)  # the cases covered
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kept = {r["id"]: r for r in records}
    assert [r["id"] for r in records] == [
        ex.id for ex, j in zip(PROBLEMS, firsts, strict=True) if j is not None
    ]
    for ex, rs, j in zip(PROBLEMS, expected, firsts, strict=True):
        if j is not None:
            assert kept[ex.id] == {
                "id": ex.id,
                "question": ex.question,
                "answer": ex.answer,
                "response": rs[j].text,
                "tries": j + 1,
            }
    accepted = sum(j is not None for j in firsts)
    n = len(PROBLEMS)
    assert (stats.problems, stats.accepted, stats.dropped, stats.samples) == (
        n,
        accepted,
        n - accepted,
        n * K,
    )
    assert stats.acceptance_rate == accepted / n
    assert stats.tries == {t: sum(j == t - 1 for j in firsts) for t in range(1, K + 1) if t - 1 in firsts}
    formed = [
        r for rs in expected for r in rs if r.finish_reason == FinishReason.STOP and not check(r.text).issues
    ]
    assert stats.well_formed == len(formed)
    assert load_stats(out) == stats


def test_killed_runs_resume_to_the_same_file(engine, unbroken, tmp_path, monkeypatch):
    out = tmp_path / "samples.jsonl"
    writes = rejection._Journal.write

    def killed_at_second_commit(self, path):  # write 1 opens the journal, write 2 commits batch 1
        if len(self.done) == 4:  # batch 2's lines are appended, its commit is lost
            raise KeyboardInterrupt
        writes(self, path)

    monkeypatch.setattr(rejection._Journal, "write", killed_at_second_commit)
    with pytest.raises(KeyboardInterrupt):
        _run(engine, out)
    committed = json.loads(stats_path_for(out).read_text())
    assert committed["done"] == ["p0", "p1"]
    assert out.stat().st_size > committed["output_bytes"]  # uncommitted lines a resume must drop
    monkeypatch.setattr(rejection._Journal, "write", writes)

    sample = rejection._sample
    calls = []

    def killed_in_third_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*args)

    monkeypatch.setattr(rejection, "_sample", killed_in_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(engine, out)  # redoes batch 2, dies in batch 3
    monkeypatch.setattr(rejection, "_sample", sample)
    stats = _run(engine, out)

    unbroken_out, unbroken_stats = unbroken
    assert out.read_bytes() == unbroken_out.read_bytes()
    assert stats == unbroken_stats
    assert json.loads(stats_path_for(out).read_text()) == json.loads(stats_path_for(unbroken_out).read_text())


def test_finished_run_is_left_alone_and_mismatches_are_refused(engine, unbroken, tmp_path, monkeypatch):
    out, stats = unbroken
    before = out.read_bytes()
    monkeypatch.setattr(rejection, "_sample", None)  # nothing left to sample: never called
    assert _run(engine, out) == stats
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="different settings"):
        rejection_sample(engine, PROBLEMS, out, k=K + 1, params=_params(engine))
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"keep": "me"}\n')
    with pytest.raises(FileExistsError, match="not a resumable"):
        _run(engine, foreign)
    with pytest.raises(ValueError, match="unique"):
        rejection_sample(engine, [PROBLEMS[0], PROBLEMS[0]], tmp_path / "d.jsonl", k=K)


def test_cli_samples_and_reports_statistics(tmp_path):
    out = tmp_path / "samples.jsonl"
    args = ["sample", "--model", "tiny", "--data", str(FIXTURES / "tiny_math.jsonl"), "--out", str(out)]
    args += ["--k", "2", "--limit", "2", "--max-new-tokens", "8", "--prompt-style", "short", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[0])
    assert (summary["problems"], summary["samples"], summary["k"]) == (2, 4, 2)
    assert load_stats(out).problems == 2 and out.is_file()
    result = CliRunner().invoke(app, [*args[:-3], "--prompt-style", "long"])
    assert result.exit_code == 2 and "prompt-style" in result.output
