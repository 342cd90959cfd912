"""The pipeline's YAML schema: one strict pydantic model per section, so a typo fails at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from npr.data import PromptStyle

STAGES = ("seed", "npr_zero", "rejection", "npr_beta", "sr_beta", "npr", "sr")
MODELS = ("seed", "npr_zero", "npr_beta", "sr_beta", "sr", "npr")
IN_DISTRIBUTION = "in_distribution"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeedSpec(_Strict):
    checkpoint: str | None = Field(
        default=None,
        description="A trained seed to start from (the demo ships one); null or --from-scratch: train it.",
    )
    init: dict[str, Any] = Field(
        default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
        description="Size of the random Qwen3 the seed is trained from (`npr.model.tiny_model` arguments).",
    )
    init_from: str | None = Field(
        default=None,
        description="Continue training this checkpoint instead of a random Qwen3 (e.g. to refresh a seed's data).",
    )
    examples: int = Field(default=20000, ge=1, description="Training examples generated for the seed.")
    noisy_fraction: float = Field(
        default=0.2, ge=0, le=1, description="Share of examples that are noisy format attempts."
    )
    shuffled_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of worked solutions that take the groups in a random order.",
    )
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields for the seed's training.")


class RejectionSpec(_Strict):
    k: int = Field(default=8, ge=1, description="Samples per problem (paper: 8).")
    problems: int = Field(default=1000, ge=1, description="Training problems to sample.")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature (paper: 1.0).")
    max_new_tokens: int = Field(default=512, ge=1)
    backend: Literal["hf", "llamacpp", "vllm"] = Field(
        default="hf",
        description="Engine of the K sequential samples (vllm: run the pipeline from .venv-vllm).",
    )


class EvalSpec(_Strict):
    backend: Literal["hf", "llamacpp"] = Field(
        default="hf",
        description="Engine of evaluation and latency: hf (PyTorch) or llamacpp (exact, faster).",
    )
    problems: int = Field(default=200, ge=1, description="Held-out problems per split (their own seed).")
    k: int = Field(default=4, ge=1, description="Samples per problem (avg@k).")
    temperature: float = Field(default=1.0, ge=0, description="Paper: 1.0.")
    top_p: float = Field(default=0.7, gt=0, le=1, description="Paper: 0.7.")
    max_new_tokens: int = Field(default=512, ge=1)
    latency_problems: int = Field(
        default=20, ge=1, description="Problems per split decoded one at a time (one sample) to time latency."
    )
    latency_repeats: int = Field(
        default=3,
        ge=1,
        description="Times each problem is timed per model, models interleaved (median kept).",
    )
    splits: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {IN_DISTRIBUTION: dict[str, Any]()},
        description="Held-out splits: name -> task options over the config's `task_options` "
        "(e.g. a split with more groups than training saw). The first is the in-distribution one.",
    )

    @field_validator("splits")
    @classmethod
    def _some_split(cls, splits: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not splits:
            raise ValueError("eval.splits needs at least one split")
        return splits


class PipelineConfig(_Strict):
    kind: Literal["pipeline"] = "pipeline"
    task: str = Field(default="group_max", description="One of npr.tasks.TASKS (it brings its verifier).")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the task's generator (e.g. group_size)."
    )
    seed: int = Field(default=0, description="Seed of data, initialisation and sampling.")
    run_dir: str = Field(description="Checkpoints and stage outputs.")
    out_dir: str = Field(description="The report: report.json, report.md, curves, samples page.")
    prompt_style: PromptStyle = Field(default="short", description="Instruction style of every prompt.")
    train_problems: int = Field(default=4000, ge=1, description="Problems RL stages draw from.")
    seed_model: SeedSpec = Field(default_factory=SeedSpec)
    npr_zero: dict[str, Any] = Field(default_factory=dict, description="RLConfig fields of stage 1.")
    rejection: RejectionSpec = Field(default_factory=RejectionSpec)
    npr_beta: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields of stage 2.")
    sr_beta: dict[str, Any] = Field(
        default_factory=dict, description="SFTConfig fields of the SR-Beta baseline."
    )
    npr: dict[str, Any] = Field(default_factory=dict, description="RLConfig fields of stage 3.")
    sr: dict[str, Any] = Field(default_factory=dict, description="RLConfig fields of the SR baseline.")
    eval: EvalSpec = Field(default_factory=EvalSpec)


def load_pipeline_config(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Read and validate a pipeline YAML; seed paths are taken relative to the file."""
    from npr.train.config import ConfigError

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        config = PipelineConfig.model_validate({**raw, **overrides})
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from e
    seed = config.seed_model
    here = Path(path).resolve().parent
    paths = {
        key: str(here / value)
        for key in ("checkpoint", "init_from")
        if (value := getattr(seed, key)) and not Path(value).is_absolute()
    }
    return config.model_copy(update={"seed_model": seed.model_copy(update=paths)})
