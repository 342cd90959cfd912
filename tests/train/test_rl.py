"""The RL recipe: selection and advantages by hand, then PAPO / DAPO / sequential-baseline steps on the tiny
model, and a run killed mid-step that resumes to the same weights as an unbroken one.

A random model never answers well, so each test prompt gets a processor that decides the rollout's shape
(well formed with sampled contents, malformed, cut by the length limit, or one fixed text), and
`varied_check` makes correctness depend on the sampled text, so that groups are not constant.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import npr.cli.train_rl  # noqa: F401  (registers `npr train rl` until npr.cli imports it)
from npr.cli import app
from npr.data import Example, build_prompt
from npr.format import TagIds
from npr.model import tiny_model
from npr.train.checkpoint import latest_checkpoint
from npr.train.config import RLConfig
from npr.train.loop import read_metrics
from npr.train.rl import rollout_seed, step_prompts, train
from npr.train.scoring import METRICS, Scores, select
from tests.scripted import PerPrompt, Script

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FORKS = "What is 2 + 3?"
FORKS_TOO = "What is 7 + 8?"
# A well-formed, correct response (format penalty 0): the same text for every sample, so a constant group.
PERFECT = (
    "<guideline><plan>1: add two and three</plan></guideline><step>1: two plus three is five</step>"
    "<takeaway>the sum is five</takeaway>so \\boxed{5}"
)

# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Forced:
    """Force `response` token by token after a prompt of `prompt_len` tokens, then end-of-sequence."""

    prompt_len: int
    response: list[int]
    eos: int

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        written = len(visible) - self.prompt_len
        token = self.response[written] if written < len(self.response) else self.eos
        out = torch.full_like(logits, float("-inf"))
        out[token] = 0.0
        return out


@dataclass
class Rambling:
    """Free text that never ends (tags and end-of-sequence banned), so the length limit cuts it."""

    banned: list[int]

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.banned] = float("-inf")
        return logits


def varied_check(text: str, example: Example) -> bool:
    """'Correct' for about half of all texts, by a stable hash (Python's `hash` is salted per process).

    Which texts pass depends on the sampled tokens: when the sampler changes, check that groups still
    vary (the step tests fail on zero gradients if a group comes out constant)."""
    return zlib.adler32(text.encode()) % 2 == 0


def rl_config(tmp_path: Path, questions: list[str], **overrides: Any) -> RLConfig:
    """A tiny config whose every step takes each of `questions` once; `overrides` are config fields."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in questions))
    fields: dict[str, Any] = {
        "model_path": "tiny",
        "data": str(data),
        "out_dir": str(tmp_path / "run"),
        "prompts_per_step": len(questions),
        "rollouts_per_prompt": 2,
        "max_steps": 1,
        "max_new_tokens": 48,
        "lr": 1e-3,
        "micro_batch_size": 4,
        "save_every": 0,
        **overrides,
    }
    return RLConfig(**fields)


def scripted(shapes: dict[str, str], *, parallel: bool = True) -> PerPrompt:
    """A processor per question: `shapes[question]` is "forks", "malformed", "rambling" or a text to force."""
    _, tokenizer = tiny_model()
    tags = TagIds.from_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    scripts: dict[tuple[int, ...], Any] = {}
    for question, shape in shapes.items():
        prompt = build_prompt(tokenizer, question, parallel=parallel)
        if shape == "forks":
            scripts[tuple(prompt)] = Script(tokenizer, [[2, 2]], takeaway_len=2, final_len=1)
        elif shape == "malformed":  # </step> in the trunk: the engine stops at the violation
            scripts[tuple(prompt)] = Forced(len(prompt), [tags.step_close], eos)
        elif shape == "rambling":
            scripts[tuple(prompt)] = Rambling([*tags.as_tuple(), eos])
        else:
            scripts[tuple(prompt)] = Forced(
                len(prompt), tokenizer(shape, add_special_tokens=False)["input_ids"], eos
            )
    return PerPrompt(scripts)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def initial_weights() -> dict[str, torch.Tensor]:
    model, _ = tiny_model(seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs faster on one thread of a shared, busy CPU than on contending threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ by hand


def test_step_prompts_walk_one_seeded_shuffle_per_epoch():
    steps = [step_prompts(5, 2, seed=3, step=s) for s in range(5)]  # 10 draws = 2 epochs of 5
    flat = [i for s in steps for i in s]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert steps == [step_prompts(5, 2, seed=3, step=s) for s in range(5)]
    assert flat != [i for s in range(5) for i in step_prompts(5, 2, seed=4, step=s)]


def test_rollout_seed_is_a_pure_function_of_seed_step_and_position():
    seeds = {rollout_seed(seed, step, pos) for seed in (0, 1) for step in (0, 1) for pos in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= s < 2**62 for s in seeds)
    assert rollout_seed(0, 5, 2) == rollout_seed(0, 5, 2)


def _scores(group: list[int], reward: list[int], malformed=None, cut=None) -> Scores:
    n = len(group)

    def col(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    zeros = [0.0] * n
    return Scores(
        col(group), col(reward), col(malformed or zeros), col(cut or zeros), *(col(zeros) for _ in range(4))
    )


def test_select_drops_malformed_and_cut_then_scales_by_the_kept_batch_std(tmp_path):
    config = rl_config(tmp_path, [FORKS])  # papo preset: batch_std, no dynamic sampling
    scores = _scores(
        [0, 0, 1, 1, 1, 1], [1, -1, 1, -1, 1, 1], malformed=[0, 0, 0, 0, 1, 0], cut=[0] * 5 + [1]
    )
    keep, advantages, dropped = select(scores, config)
    assert keep.tolist() == [True] * 4 + [False] * 2 and dropped == 0
    # Kept rewards (1, -1, 1, -1): group means 0, batch std sqrt(4/3) (Bessel) -> ±sqrt(3)/2.
    expected = torch.tensor([1, -1, 1, -1, 0, 0], dtype=torch.float64) * 3**0.5 / 2
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


def test_select_dynamic_sampling_drops_constant_groups(tmp_path):
    config = rl_config(tmp_path, [FORKS], algorithm="dapo")  # group_std, dynamic sampling
    keep, advantages, dropped = select(_scores([0, 0, 1, 1], [1, 1, 1, -1]), config)
    assert keep.tolist() == [False, False, True, True] and dropped == 2
    # Group 1: (±1 - 0) / (std(1, -1) + 1e-6) = ±1/sqrt(2).
    expected = torch.tensor([0, 0, 0.5**0.5, -(0.5**0.5)], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ steps


def test_papo_step_drops_malformed_and_cut_rollouts_and_updates_the_weights(tmp_path):
    shapes = {FORKS: "forks", FORKS_TOO: "forks", "What is 6 * 7?": "malformed", "What is 9 - 1?": "rambling"}
    config = rl_config(tmp_path, list(shapes))
    final = train(config, check=varied_check, logits_processors=[scripted(shapes)])

    [m] = read_metrics(config.out_dir)
    assert set(m) == {"step", *METRICS}
    assert m["filtered/malformed"] == 2 and m["filtered/length"] == 2 and m["rollout/kept"] == 4
    assert m["rollout/parallel_rate"] == 0.5  # the 4 scripted rollouts fork, the others never do
    assert m["rollout/format_valid"] <= 0.5 and m["filtered/constant_group"] == 0
    assert -1 <= m["reward/mean"] <= 1 and 0 < m["reward/accuracy"] < 1
    assert m["tokens/critical_path"] < m["tokens/total"] <= config.max_new_tokens
    assert m["train/updates"] == 1 and m["train/clip_fraction"] == 0 and m["train/grad_norm"] > 0
    assert m["train/logprob_gap"] < 1e-4  # the trainer's log-probs are the engine's (float32, CPU)
    assert m["time/step"] >= m["time/rollout"] + m["time/scoring"] + m["time/logprob"] + m["time/update"]
    before, after = initial_weights(), weights(final)
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-4


def test_dapo_drops_constant_groups_and_clips_on_the_second_update(tmp_path):
    shapes = {FORKS: "forks", FORKS_TOO: PERFECT}  # the PERFECT group's rewards are all equal
    config = rl_config(tmp_path, list(shapes), algorithm="dapo", updates_per_batch=2, lr=1e-2)
    assert config.mode == "sequential" and config.clip and config.format_reward
    train(config, check=varied_check, logits_processors=[scripted(shapes)])

    [m] = read_metrics(config.out_dir)
    assert m["filtered/constant_group"] == 2 and m["rollout/kept"] == 2
    assert m["rollout/parallel_rate"] == 0 and m["filtered/malformed"] == m["filtered/length"] == 0
    assert m["train/updates"] == 2
    # The first update's ratio is exactly 1 (nothing clipped); the second, after a large step, is not.
    assert 0 < m["train/clip_fraction"] < 0.5


def test_sequential_baseline_asks_for_plain_reasoning_and_keeps_every_rollout(tmp_path):
    shapes = {FORKS: "forks", FORKS_TOO: "forks"}
    config = rl_config(tmp_path, list(shapes), mode="sequential")
    assert config.algorithm == "papo" and not config.format_reward
    # Script forces the tags but sees the plain prompt: the processor is keyed by the sequential prompt.
    train(config, check=varied_check, logits_processors=[scripted(shapes, parallel=False)])
    [m] = read_metrics(config.out_dir)
    assert m["rollout/kept"] == 4 and m["rollout/parallel_rate"] == 0
    assert m["tokens/critical_path"] == m["tokens/total"]


# ------------------------------------------------------------------------------------------------ resume


class Killed(Exception):
    """Stands for the process dying (KeyboardInterrupt would stop pytest itself)."""


@dataclass
class KillDuringStep:
    """`varied_check` that raises while scoring step `step` (1-based), as if the process died there."""

    step: int
    calls_per_step: int
    calls: int = 0

    def __call__(self, text: str, example: Example) -> bool:
        self.calls += 1
        if self.calls > (self.step - 1) * self.calls_per_step:
            raise Killed
        return varied_check(text, example)


def test_run_killed_mid_step_resumes_to_the_weights_of_an_unbroken_run(tmp_path):
    shapes = {FORKS: "forks", FORKS_TOO: "forks"}
    processors = [scripted(shapes)]
    (tmp_path / "a").mkdir()
    unbroken = rl_config(tmp_path / "a", list(shapes), max_steps=2, save_every=1)
    expected = weights(train(unbroken, check=varied_check, logits_processors=processors))

    (tmp_path / "b").mkdir()
    broken = rl_config(tmp_path / "b", list(shapes), max_steps=2, save_every=1)
    with pytest.raises(Killed):  # checkpoint step-000001 is on disk, step 2 dies while scoring
        train(broken, check=KillDuringStep(step=2, calls_per_step=4), logits_processors=processors)
    assert latest_checkpoint(broken.out_dir).name == "step-000001"  # so the rerun below resumes
    assert len(read_metrics(broken.out_dir)) == 1
    got = weights(train(broken, check=varied_check, logits_processors=processors))

    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    before = initial_weights()
    assert any(not torch.equal(expected[k], before[k]) for k in expected)  # the run did learn

    def untimed(run: RLConfig) -> list[dict[str, float]]:
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in read_metrics(run.out_dir)]

    assert untimed(broken) == untimed(unbroken) and len(untimed(broken)) == 2


# ------------------------------------------------------------------------------------------------ command


@pytest.mark.parametrize("name", ["tiny_rl_papo", "tiny_rl_dapo"])
def test_npr_train_rl_runs_a_shipped_tiny_config(tmp_path, name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config |= {"out_dir": str(tmp_path / "run"), "data": str(CONFIGS.parent / config["data"]), "max_steps": 1}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", "rl", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("step-000001")
    [m] = read_metrics(tmp_path / "run")
    assert m["step"] == 1 and m["train/lr"] == config["lr"]
    generated = config["prompts_per_step"] * config["rollouts_per_prompt"]
    dropped = m["filtered/malformed"] + m["filtered/length"] + m["filtered/constant_group"]
    assert m["rollout/kept"] + dropped == generated


def test_npr_train_rl_names_the_bad_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: rl\nmodel_path: tiny\nout_dir: x\ndata: y\nadvantage: group_mean\n")
    result = CliRunner().invoke(app, ["train", "rl", str(path)])
    assert result.exit_code == 2 and "advantage" in result.output
