"""Training configs: paper defaults, presets, load errors, and every shipped YAML config."""

from pathlib import Path

import pytest
import yaml

from npr.train.config import (
    ALGORITHM_PRESETS,
    CONFIG_KINDS,
    ConfigError,
    RLConfig,
    SFTConfig,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _known_kind_configs() -> list[Path]:
    """Every configs/**/*.yaml whose `kind` key names a training config."""
    found = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and data.get("kind") in CONFIG_KINDS:
            found.append(path)
    return found


SHIPPED = _known_kind_configs()


def _rl(**fields) -> RLConfig:
    return RLConfig.model_validate({"model_path": "m", "out_dir": "o", "data": "d.jsonl", **fields})


def test_sft_defaults_are_the_papers():
    cfg = SFTConfig(model_path="m", out_dir="o", data_path="d.jsonl")
    assert (cfg.lr, cfg.lr_end, cfg.schedule) == (1e-6, 5e-7, "cosine")
    assert (cfg.weight_decay, cfg.betas[1], cfg.epochs, cfg.parallel) == (0.1, 0.95, 1, True)


def test_rl_defaults_are_papos():
    cfg = _rl()
    assert (cfg.algorithm, cfg.lr, cfg.prompts_per_step, cfg.rollouts_per_prompt) == ("papo", 1e-7, 16, 16)
    assert (cfg.grad_clip, cfg.updates_per_batch, cfg.eps_low, cfg.eps_high) == (1.0, 1, 0.2, 0.28)
    # the field defaults and the PAPO preset must agree, or `algorithm: papo` would change them
    assert {key: getattr(cfg, key) for key in ALGORITHM_PRESETS["papo"]} == ALGORITHM_PRESETS["papo"]


def test_dapo_preset_and_overrides():
    dapo = _rl(algorithm="dapo")
    assert dapo.mode == "sequential" and dapo.advantage == "group_std"
    assert dapo.clip and dapo.dynamic_sampling and dapo.format_reward
    ablation = _rl(algorithm="dapo", clip=False, advantage="mean")
    assert (ablation.clip, ablation.advantage, ablation.dynamic_sampling) == (False, "mean", True)


def test_every_field_is_documented():
    for cls in CONFIG_KINDS.values():
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_cross_field_checks():
    with pytest.raises(ValueError, match="lr_end must be <= lr"):
        SFTConfig(model_path="m", out_dir="o", data_path="d", lr=1e-6, lr_end=1e-5)
    with pytest.raises(ValueError, match="betas must each be in"):
        _rl(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="rollouts_per_prompt"):
        _rl(rollouts_per_prompt=1)


def test_load_config_names_file_and_bad_fields(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: rl\nmodel_path: m\nout_dir: o\ndata: d\nlrr: 1.0e-7\nadvantage: batchstd\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, RLConfig)
    message = str(info.value)
    assert str(path) in message and "RLConfig" in message
    assert "lrr: Extra inputs are not permitted" in message
    assert "advantage: Input should be 'group_std', 'batch_std' or 'mean'" in message


def test_load_config_rejects_the_wrong_kind_and_non_mappings(tmp_path):
    rl_file = tmp_path / "rl.yaml"
    rl_file.write_text("kind: rl\nmodel_path: m\nout_dir: o\ndata: d\n")
    with pytest.raises(ConfigError, match="kind: Input should be 'sft'"):
        load_config(rl_file, SFTConfig)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping, got list"):
        load_config(listing, RLConfig)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml", RLConfig)


def test_configs_are_frozen():
    with pytest.raises(ValueError, match="frozen"):
        _rl().lr = 1.0  # type: ignore[misc]


def test_paper_configs_are_shipped():
    names = {path.relative_to(CONFIGS).as_posix() for path in SHIPPED}
    assert {"paper/npr_beta_sft.yaml", "paper/npr_papo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_config_loads(path):
    kind = yaml.safe_load(path.read_text())["kind"]
    cfg = load_config(path, CONFIG_KINDS[kind])
    assert cfg.kind == kind


def test_paper_configs_carry_the_paper_settings():
    sft = load_config(CONFIGS / "paper" / "npr_beta_sft.yaml", SFTConfig)
    assert (sft.lr, sft.lr_end, sft.schedule, sft.weight_decay, sft.betas[1], sft.epochs) == (
        1e-6,
        5e-7,
        "cosine",
        0.1,
        0.95,
        1,
    )
    papo = load_config(CONFIGS / "paper" / "npr_papo.yaml", RLConfig)
    assert (papo.algorithm, papo.mode, papo.advantage, papo.clip, papo.format_reward) == (
        "papo",
        "parallel",
        "batch_std",
        False,
        False,
    )
    assert (papo.lr, papo.prompts_per_step, papo.rollouts_per_prompt, papo.grad_clip) == (1e-7, 16, 16, 1.0)
    assert papo.updates_per_batch == 1


def test_every_paper_config_line_cites_a_source():
    for path in (CONFIGS / "paper").glob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                assert "#" in line, f"{path.name}:{number} has no source comment"


def test_bad_algorithm_is_a_validation_error():
    with pytest.raises(ValueError, match="algorithm"):
        _rl(algorithm=["papo"])
