"""`group_max`: the verifier checks every intermediate result; noisy attempts are never clean; the seed
corpus is reproducible; `npr.tasks` stands without `npr.data`."""

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.format import Block, Item, Trajectory, check, parse, render
from npr.tasks import (
    LABELS,
    check_group_max,
    make_group_max,
    noisy_attempt,
    parallel_solution,
    seed_corpus,
    sequential_solution,
)

problems = st.integers(0, 10_000).map(lambda seed: make_group_max(1, seed=seed)[0])


@given(problems)
def test_both_solutions_pass_and_the_parallel_one_is_well_formed(ex):
    assert check_group_max(sequential_solution(ex), ex)
    trace = parallel_solution(ex)
    assert check(trace).ok and check_group_max(trace, ex)
    assert len(parse(trace).blocks[0].plans) == len(ex.meta["groups"])


@given(problems, st.integers(0, 2**32 - 1))
def test_a_solution_in_any_group_order_passes(ex, seed):
    text = sequential_solution(ex, random.Random(seed))
    assert check_group_max(text, ex)
    assert set(_chains(text)) == set(_chains(sequential_solution(ex)))


def _chains(solution: str) -> list[str]:
    """The running-sum lines of a sequential solution (everything before the decision)."""
    return solution.rsplit(". ", 1)[0].split(". ")


@given(problems)
def test_the_decision_must_name_a_group_with_the_largest_sum(ex):
    text = sequential_solution(ex)
    sums = [sum(g) for g in ex.meta["groups"]]
    best = max(sums)
    head, decision = text.rsplit(". ", 1)
    for i, total in enumerate(sums):  # a tie: any group with the largest sum is a right decision
        named = f"{head}. max {LABELS[i]}={best} \\boxed{{{ex.answer}}}"
        assert check_group_max(named, ex) == (total == best)
    assert not check_group_max(f"{head}. \\boxed{{{ex.answer}}}", ex)  # no decision at all
    # The keyword counts (RL drifted to "ax" when it did not).
    assert not check_group_max(f"{head}. {decision.replace('max', 'ax', 1)}", ex)


def test_a_wrong_total_is_not_hidden_by_a_right_decision():
    ex = make_group_max(1, seed=3)[0]
    text = sequential_solution(ex)
    label, total = text.split(" so ", 1)[1].split(".", 1)[0].split("=")
    wrong = text.replace(f"so {label}={total}", f"so {label}={int(total) + 1}", 1)
    assert check_group_max(text, ex) and not check_group_max(wrong, ex)


@given(problems, st.data())
def test_one_wrong_intermediate_sum_fails_even_with_the_right_answer(ex, data):
    text = sequential_solution(ex)
    equations = [i for i, ch in enumerate(text) if ch == "="]
    at = data.draw(st.sampled_from(equations))
    end = at + 1
    while text[end].isdigit():
        end += 1
    wrong = text[: at + 1] + str(int(text[at + 1 : end]) + 1) + text[end:]
    assert not check_group_max(wrong, ex)


def test_a_merged_plan_with_the_right_answer_is_rejected():
    ex = make_group_max(1, seed=5)[0]
    clean = parse(parallel_solution(ex))
    block = clean.blocks[0]
    lumped = Item("1", " ".join(step.text for step in block.steps))
    merged = render(Trajectory((Block((Item("1", "sum all"),), (lumped,), block.takeaway),), clean.final))
    assert check(merged).ok and not check_group_max(merged, ex)


@settings(max_examples=300)
@given(problems, st.integers(0, 2**32 - 1))
def test_a_noisy_attempt_is_never_a_clean_trace_but_keeps_the_right_answer(ex, seed):
    text = noisy_attempt(ex, random.Random(seed))
    assert not check(text).ok
    assert text.endswith(f"\\boxed{{{ex.answer}}}")


def test_noisy_attempts_draw_each_flaw_on_its_own():
    """Every flaw shows up alone, so a seed sees clean parts next to each broken one."""
    rng = random.Random(0)
    seen = set()
    for ex in make_group_max(400, seed=1):
        codes = frozenset(issue.code for issue in check(noisy_attempt(ex, rng)).issues)
        seen.add(codes)
    assert frozenset({"step_count"}) in seen  # merged plan or lumped steps, nothing else wrong
    assert any("nested_tag" in codes for codes in seen)  # a step left open before the next one
    assert any("unclosed" in codes for codes in seen)  # no takeaway: the block never closes
    assert frozenset({"stray_text"}) in seen  # right structure, " then " between two steps
    assert frozenset({"missing_id", "step_id_mismatch"}) in seen  # right structure, a step without its ID


def test_small_flaws_score_above_every_structural_one():
    """So format RL, climbing the graded penalty, moves towards the right structure."""
    rng = random.Random(0)
    by_kind: dict[bool, list[float]] = {True: [], False: []}
    for ex in make_group_max(400, seed=2):
        report = check(noisy_attempt(ex, rng))
        small = {issue.code for issue in report.issues} <= {"stray_text", "missing_id", "step_id_mismatch"}
        by_kind[small].append(report.penalty)
    assert min(by_kind[True]) > max(by_kind[False])


def test_numbers_stay_in_the_asked_range_and_a_bad_range_is_refused():
    examples = make_group_max(50, seed=0, min_number=6, max_number=9)
    assert {x for ex in examples for g in ex.meta["groups"] for x in g} == {6, 7, 8, 9}
    with pytest.raises(ValueError, match="min_number"):
        make_group_max(1, min_number=5, max_number=10)


def test_the_seed_corpus_is_reproducible_and_mixes_its_two_kinds():
    examples = make_group_max(400, seed=0)

    def corpus(seed: int) -> list:
        return seed_corpus(
            examples,
            sequential_solution,
            noisy_attempt,
            seed=seed,
            noisy_fraction=0.25,
            shuffled_fraction=1.0,
        )

    first = corpus(0)
    assert first == corpus(0) and first != corpus(1)
    noisy = [r for r in first if r.parallel]
    assert 0.18 < len(noisy) / len(first) < 0.32
    assert all(not check(r.response).ok for r in noisy)
    solutions = [r for r in first if not r.parallel]
    assert all(
        check_group_max(r.response, ex) for r, ex in zip(first, examples, strict=True) if not r.parallel
    )
    assert any(not r.response.startswith("A:") for r in solutions)  # shuffled group order


def test_tasks_import_without_the_data_module():
    code = "import sys, npr.tasks; assert 'npr.data' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
