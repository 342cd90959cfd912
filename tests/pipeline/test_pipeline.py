"""A reduced demo config runs every stage end to end and writes the report (minutes on 2 cores)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from npr.cli import app
from npr.data import load_dataset
from npr.pipeline import MODELS, STAGES, Pipeline, load_pipeline_config
from npr.pipeline.figures import curve_series

TINY = {
    "kind": "pipeline",
    "task": "group_max",
    "prompt_style": "short",
    "train_problems": 16,
    "seed_model": {
        "init": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        "examples": 64,
        "sft": {"lr": 3e-3, "lr_end": 3e-4, "batch_size": 16, "max_steps": 3, "save_every": 0},
    },
    "npr_zero": {
        "prompts_per_step": 2,
        "rollouts_per_prompt": 2,
        "max_steps": 1,
        "max_new_tokens": 48,
        "lr": 1e-4,
    },
    "rejection": {"k": 2, "problems": 4, "max_new_tokens": 48},
    "npr_beta": {"lr": 1e-4, "batch_size": 1, "max_steps": 1},
    "sr_beta": {"lr": 1e-4, "batch_size": 1, "max_steps": 1},
    "npr": {
        "prompts_per_step": 2,
        "rollouts_per_prompt": 2,
        "max_steps": 1,
        "max_new_tokens": 48,
        "lr": 1e-4,
    },
    "sr": {"prompts_per_step": 2, "rollouts_per_prompt": 2, "max_steps": 1, "max_new_tokens": 48, "lr": 1e-4},
    "eval": {
        "problems": 3,
        "k": 2,
        "max_new_tokens": 48,
        "latency_problems": 2,
        "latency_repeats": 3,
        "splits": {"in_distribution": {}, "two_groups": {"min_groups": 2, "max_groups": 2}},
    },
}


@pytest.fixture
def config(tmp_path):
    """The reduced config, writing under tmp_path (runs/, out/)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump({**TINY, "run_dir": str(tmp_path / "runs"), "out_dir": str(tmp_path / "out")})
    )
    return path


def test_reduced_pipeline_runs_every_stage_and_writes_the_report(tmp_path, config):
    result = CliRunner().invoke(app, ["pipeline", str(config), "--from-scratch"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["splits"]) == {"in_distribution", "two_groups"}
    for rows in report["splits"].values():
        assert set(rows) == set(MODELS)
        for row in rows.values():
            for name in ("accuracy", "intermediates_correct", "speedup_latency"):
                low, high = row[f"{name}_ci"]
                assert low <= row[name] <= high, (name, row)
            assert 0 <= row["accuracy"] <= 1 and row["tps"] > 0 and row["latency_s"] > 0
        seed = rows["seed"]
        assert seed["speedup_tps"] == seed["speedup_path"] == seed["speedup_latency"] == 1.0
        assert seed["speedup_latency_ci"] == [1.0, 1.0] and seed["parallel_rate"] == 0.0
    assert report["latency"]["repeats"] == 3 and report["latency"]["problems"] == {
        "in_distribution": 2,
        "two_groups": 2,
    }
    tries = json.loads((tmp_path / "out" / "latency.json").read_text())["tries"]
    assert all(len(t) == 3 for models in tries.values() for rows in models.values() for t in rows)
    pairs = {(c["split"], c["a"], c["b"], c["metric"]) for c in report["comparisons"]}
    assert ("two_groups", "npr", "npr_beta", "intermediates_correct") in pairs
    assert all(
        c["significant"] == (c["difference_ci"][0] > 0 or c["difference_ci"][1] < 0)
        for c in report["comparisons"]
    )
    assert "### two_groups" in result.output and "paired bootstrap" in result.output
    for stage in STAGES:
        assert (tmp_path / "runs" / stage / "done.json").exists()
    for name in ("report.md", "curves.png", "samples.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    curves = curve_series(tmp_path / "runs")  # every trained stage's panel has points to draw
    assert {"seed", "npr_zero", "npr", "sr"} <= set(curves)  # the Betas train only if rejection accepts
    assert all(steps and len(steps) == len(values) for c in curves.values() for steps, values in c.values())
    # A re-run finds every stage and evaluation cached.
    again = Pipeline(load_pipeline_config(config), from_scratch=True, log=lambda _: None)
    assert again.run() == report


def test_until_stops_after_the_named_stage_without_a_report(tmp_path, config):
    result = CliRunner().invoke(app, ["pipeline", str(config), "--until", "seed"])
    assert result.exit_code == 0, result.output
    assert "seed: " in result.output
    assert (tmp_path / "runs" / "seed" / "done.json").exists()
    assert not (tmp_path / "runs" / "npr_zero").exists() and not (tmp_path / "out").exists()


def test_a_stage_cached_with_other_settings_stops_the_run_and_is_kept(tmp_path, config):
    assert CliRunner().invoke(app, ["pipeline", str(config), "--until", "seed"]).exit_code == 0
    done = (tmp_path / "runs" / "seed" / "done.json").read_text()
    changed = yaml.safe_load(config.read_text())
    changed["seed_model"]["examples"] = 65
    config.write_text(yaml.safe_dump(changed))
    result = CliRunner().invoke(app, ["pipeline", str(config), "--until", "seed"])
    assert result.exit_code == 2
    assert "[seed]" in result.output and "other settings (changed: seed_model)" in result.output
    assert (tmp_path / "runs" / "seed" / "done.json").read_text() == done


def test_until_names_the_stages_when_given_an_unknown_one(tmp_path, config):
    result = CliRunner().invoke(app, ["pipeline", str(config), "--until", "seeds"])
    assert result.exit_code == 2
    assert "'seeds' is not a stage" in result.output and "npr_zero" in result.output
    assert not (tmp_path / "runs").exists()


def test_the_shipped_demo_config_validates_every_stage():
    config = load_pipeline_config("configs/demo.yaml")
    pipeline = Pipeline(config, log=lambda _: None)  # builds every stage's config
    assert (
        pipeline.rl_config("npr", "m").algorithm == "papo"
        and pipeline.rl_config("sr", "m").mode == "sequential"
    )
    assert (
        pipeline.sft_config("npr_beta", "m", "d").parallel
        and not pipeline.sft_config("sr_beta", "m", "d").parallel
    )


@pytest.mark.parametrize(
    ("override", "name"),
    [({"npr": {"lrr": 1.0}}, "lrr"), ({"eval": {"splits": {"x": {"groupsize": 7}}}}, "groupsize")],
)
def test_a_typo_in_a_stage_or_a_split_fails_at_load_and_names_it(override, name):
    config = load_pipeline_config("configs/demo.yaml", **override)
    with pytest.raises(ValueError, match=name):
        Pipeline(config, log=lambda _: None)


def test_task_options_shape_every_stage_s_problems():
    config = load_pipeline_config("configs/demo.yaml", task_options={"min_groups": 2, "max_groups": 2})
    pipeline = Pipeline(config, log=lambda _: None)
    rl_data = load_dataset(pipeline.rl_config("npr", "m").data)
    for examples in (rl_data, pipeline.eval_examples(), pipeline.problems(4, seed=1)):
        assert {len(ex.meta["groups"]) for ex in examples} == {2}


def test_a_split_s_task_options_apply_over_the_config_s():
    splits = {"in_distribution": {}, "wide": {"group_size": 7}}
    config = load_pipeline_config("configs/demo.yaml", eval={"splits": splits})
    pipeline = Pipeline(config, log=lambda _: None)
    wide = pipeline.eval_examples("wide")
    assert {len(g) for ex in wide for g in ex.meta["groups"]} == {7}
    assert {len(ex.meta["groups"]) for ex in wide} == {config.task_options["min_groups"]}
    assert {len(g) for ex in pipeline.eval_examples() for g in ex.meta["groups"]} == {6}


def test_a_bad_task_option_fails_at_load_and_names_it(tmp_path, config):
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "task_options": {"group_sise": 6}}))
    result = CliRunner().invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 2 and "group_sise" in result.output
    assert not (tmp_path / "runs").exists()
