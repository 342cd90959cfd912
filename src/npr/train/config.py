"""Training configs: pydantic models read from YAML, checked when loaded, not mid-run (DESIGN §5).

Each field's description is its only documentation (CLI help and docs read it) and cites the paper's
setting where there is one. A YAML file says which model it is with a `kind` key (`sft` or `rl`, see
`CONFIG_KINDS`); `load_config(path, SFTConfig)` also accepts a file without it. Unknown keys are errors.

An RL config's `algorithm` picks the paper's preset for the options the two algorithms differ in
(`ALGORITHM_PRESETS`); a key set in the file overrides its preset, which is how ablations are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from npr.data import PromptStyle
from npr.format import MAX_PLANS
from npr.train.advantages import AdvantageKind


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the file and fields."""


class _TrainConfig(BaseModel):
    """Fields every trainer has: where from, where to, optimiser, checkpoints, logging."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_path: str = Field(
        description="Model to train: a `save_pretrained` folder, or a run directory (its latest checkpoint)."
    )
    out_dir: str = Field(description="Run directory: checkpoints `step-NNNNNN/`, the `latest` file, logs.")
    seed: int = Field(default=0, description="Seed for data order, sampling and initialisation. Ours.")
    lr: float = Field(gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field(description="AdamW (β1, β2), each in [0, 1).")
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm to this value; null: no clipping."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="Parameter dtype. float32 for exact tests on CPU; bfloat16 for real models. Ours.",
    )
    save_every: int = Field(
        default=100,
        ge=0,
        description="Save a checkpoint every this many optimizer steps (and at the end); 0: end only. Ours.",
    )
    keep_last: int = Field(
        default=2, ge=1, description="Checkpoints kept in `out_dir`; older ones are deleted. Ours."
    )
    log_every: int = Field(default=1, ge=1, description="Log metrics every this many optimizer steps. Ours.")
    attention: Literal["auto", "dense", "flex"] = Field(
        default="auto",
        description="Attention kernel of the training forwards: dense (SDPA with a [B, 1, L, L] mask), flex "
        "(FlexAttention with a BlockMask: O(L²/128²) mask memory, masked tiles skipped; CUDA only, since it "
        "has no CPU backward), auto: flex on CUDA, dense elsewhere. Both masks come from one rule "
        "(`npr.attention`). Ours.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="Compute precision: bf16 runs forwards under bfloat16 autocast (FSDP: bf16 parameter "
        "gathers, fp32 gradient reduction) with parameters kept in `dtype`; log-probs and losses are "
        "float32 either way. Ours.",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each decoder layer's activations in backward instead of storing them: "
        "activation memory of one layer instead of all, for ~1/3 more compute. Ours.",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Under torchrun: ddp (a full model per process) or fsdp (FSDP2 `fully_shard` per "
        "decoder layer and root: parameters, gradients and optimizer state sharded). Checkpoints are full "
        "state dicts either way. The paper trains stage 2 with FSDP.",
    )
    packing: bool = Field(
        default=True,
        description="Pack several whole sequences into each row (no attention across them, positions "
        "restart) instead of padding every sequence to the longest; the loss and gradients are the same. "
        "Ours.",
    )
    max_tokens_per_row: int | None = Field(
        default=None,
        ge=1,
        description="Token budget of a packed row. null: `max_len` (SFT) or the longest sequence of the "
        "step (RL). Ours.",
    )
    micro_batch_tokens: int = Field(
        default=16384,
        ge=1,
        description="Token budget of one forward pass when packing: micro_batch_tokens // "
        "max_tokens_per_row rows (at least one). Ours.",
    )
    prompt_style: PromptStyle = Field(
        default="full",
        description="Instruction text in prompts: `full` explains the format (pretrained models); `short` is "
        "a few-token cue for models trained from scratch, such as the demo's. Ours.",
    )

    @model_validator(mode="after")
    def _check_betas(self) -> _TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        return self


class SFTConfig(_TrainConfig):
    """Supervised fine-tuning on accepted trajectories: NPR-Beta (parallel) or its sequential baseline."""

    kind: Literal["sft"] = Field(default="sft", description="Config kind; `sft` for this model.")
    data_path: str = Field(description="JSONL of accepted trajectories, as written by `npr sample`.")
    parallel: bool = Field(
        default=True,
        description="Parallel SFT with the layout's attention mask and position ids (paper, NPR-Beta); "
        "false: causal SFT on the same tokens (the sequential baseline).",
    )
    lr: float = Field(default=1e-6, gt=0, description="Peak learning rate. Paper (NPR-Beta): 1e-6.")
    lr_end: float = Field(
        default=5e-7, ge=0, description="Final learning rate of the cosine schedule. Paper (NPR-Beta): 5e-7."
    )
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine",
        description="Learning-rate schedule: cosine from `lr` to `lr_end`, or constant `lr`. Paper: cosine.",
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay. Paper (NPR-Beta): 0.1.")
    betas: tuple[float, float] = Field(
        default=(0.9, 0.95),
        description="AdamW (β1, β2). Paper (NPR-Beta): β2 0.95; β1 0.9 is AdamW's default.",
    )
    epochs: int = Field(default=1, ge=1, description="Passes over the data. Paper (NPR-Beta): 1.")
    max_steps: int | None = Field(
        default=None,
        gt=0,
        description="Stop after this many optimizer steps, before `epochs` ends; null: no cap.",
    )
    batch_size: int = Field(default=8, ge=1, description="Sequences per micro-batch on each process. Ours.")
    grad_accum: int = Field(
        default=1,
        ge=1,
        description="Micro-batches per optimizer step; the loss is a token mean over all of them. Ours.",
    )
    max_len: int = Field(
        default=4096,
        ge=2,
        description="Longest prompt + response in tokens; longer examples are dropped, never cut (a cut "
        "branch breaks the layout). Ours.",
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> SFTConfig:
        if self.schedule == "cosine" and self.lr_end > self.lr:
            raise ValueError(
                f"lr_end must be <= lr for a cosine decay, got lr_end={self.lr_end}, lr={self.lr}"
            )
        return self


Algorithm = Literal["dapo", "papo"]

# The paper's choices per algorithm (DESIGN §5): stage 1 is DAPO with sequential rollouts and the
# format + accuracy reward; stage 3 is PAPO with parallel rollouts and accuracy only.
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "dapo": {
        "mode": "sequential",
        "advantage": "group_std",
        "clip": True,
        "dynamic_sampling": True,
        "format_reward": True,
    },
    "papo": {
        "mode": "parallel",
        "advantage": "batch_std",
        "clip": False,
        "dynamic_sampling": False,
        "format_reward": False,
    },
}


class RLConfig(_TrainConfig):
    """Reinforcement learning: NPR-Zero (DAPO, sequential), NPR (PAPO, parallel) and their ablations."""

    kind: Literal["rl"] = Field(default="rl", description="Config kind; `rl` for this model.")
    data: str = Field(description="Training prompts with gold answers: a dataset spec read by `npr.data`.")
    algorithm: Algorithm = Field(
        default="papo",
        description="dapo: NPR-Zero's (stage 1); papo: NPR's (stage 3). Picks the preset of the five "
        "fields below it (`ALGORITHM_PRESETS`); keys in the file override the preset.",
    )
    mode: Literal["parallel", "sequential"] = Field(
        default="parallel",
        description="Rollout decoding: parallel (engine forks branches; paper, PAPO) or sequential (paper, "
        "DAPO; also the sequential-RL baseline with PAPO).",
    )
    advantage: AdvantageKind = Field(
        default="batch_std",
        description="group_std: (R − group mean)/group std (DAPO); batch_std: (R − group mean)/(std of the "
        "whole batch, computed once, + 1e-6) (paper, PAPO); mean: R − group mean.",
    )
    clip: bool = Field(
        default=False,
        description="Clip the ratio as DAPO does (ε_low, ε_high) instead of PAPO's unclipped loss. Paper: "
        "PAPO does not clip, so tag tokens always get gradient. With one update per batch the ratio is 1 "
        "and clipping changes nothing.",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="Drop prompt groups whose rewards are all equal (DAPO). Paper: DAPO on; PAPO off.",
    )
    format_reward: bool = Field(
        default=False,
        description="Reward = format penalty when < 0, else ±1 accuracy; empty response −2 (paper, stage 1). "
        "false: ±1 accuracy only (paper, stage 3).",
    )
    prompts_per_step: int = Field(
        default=16, ge=1, description="Prompts per rollout batch. Paper (PAPO): 16."
    )
    rollouts_per_prompt: int = Field(
        default=16,
        ge=2,
        description="Rollouts per prompt (the group, G); at least 2, since every advantage subtracts the "
        "group mean. Paper (PAPO): 16.",
    )
    lr: float = Field(default=1e-7, gt=0, description="Learning rate, constant. Paper (PAPO): 1e-7 constant.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay. Not in DESIGN §5; ours.")
    betas: tuple[float, float] = Field(
        default=(0.9, 0.999), description="AdamW (β1, β2). Not in DESIGN §5; ours (PyTorch's default)."
    )
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm. Paper (PAPO): 1.0."
    )
    max_steps: int = Field(default=1000, ge=1, description="Rollout batches to train on. Ours.")
    updates_per_batch: int = Field(
        default=1, ge=1, description="Optimizer steps per rollout batch. Paper (PAPO): 1, strictly on-policy."
    )
    micro_batch_size: int = Field(
        default=8,
        ge=1,
        description="Rollouts per forward/backward pass; gradients accumulate over the whole batch, so it "
        "changes memory, not the update. Ours.",
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="Rollout sampling temperature. Ours (the paper samples at T 1.0 elsewhere).",
    )
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="Rollout nucleus sampling, in (0, 1]; 1: off. Ours."
    )
    max_new_tokens: int = Field(
        default=4096,
        ge=1,
        description="Token budget per rollout over all branches; rollouts that exceed it are dropped (PAPO). Ours.",
    )
    max_plans: int = Field(
        default=MAX_PLANS, ge=1, description="Most plans (branches) per block (DESIGN §2 default 5)."
    )
    eps_low: float = Field(
        default=0.2, ge=0, lt=1, description="Lower clip range, ratio ≥ 1 − eps_low (when `clip`). DAPO: 0.2."
    )
    eps_high: float = Field(
        default=0.28, ge=0, description="Upper clip range, ratio ≤ 1 + eps_high (when `clip`). DAPO: 0.28."
    )
    backend: Literal["hf", "llamacpp", "vllm"] = Field(
        default="hf",
        description="Rollout engine: hf (the trainer's own model) or vllm (sequential mode only; colocated, "
        "new weights loaded after each step). llamacpp cannot take new weights each step. Ours.",
    )
    tis_cap: float | None = Field(
        default=None,
        gt=0,
        description="Truncated importance sampling: weight each token by min(exp(logp_trainer − "
        "logp_engine), tis_cap) to correct the rollout engine's mismatch; null: off. Ours.",
    )

    @model_validator(mode="after")
    def _check_backend(self) -> RLConfig:
        if self.backend == "llamacpp":
            raise ValueError("backend llamacpp cannot load new weights after each step; use hf or vllm")
        if self.backend == "vllm" and self.mode != "sequential":
            raise ValueError(
                "backend vllm decodes sequential mode only; use backend hf for parallel rollouts"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_algorithm_preset(cls, data: Any) -> Any:
        algorithm = data.get("algorithm", "papo") if isinstance(data, dict) else None
        if isinstance(algorithm, str) and algorithm in ALGORITHM_PRESETS:
            return {**ALGORITHM_PRESETS[algorithm], **data}
        return data  # a bad `algorithm` is reported by its Literal check


CONFIG_KINDS: dict[str, type[_TrainConfig]] = {"sft": SFTConfig, "rl": RLConfig}

C = TypeVar("C", bound=BaseModel)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read the YAML file at `path` into `cls`; raise `ConfigError` naming the file and the bad fields."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid {cls.__name__}:\n{_describe(exc)}") from exc


def load_train_config(path: str | Path) -> SFTConfig | RLConfig:
    """An SFT or RL config, by the file's `kind` key (`CONFIG_KINDS`)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"{path}: `kind` must be one of {sorted(CONFIG_KINDS)}, got {kind!r}")
    if kind == "sft":
        return load_config(path, SFTConfig)
    return load_config(path, RLConfig)
