"""Native parallel decoding: `ParallelEngine(model, tokenizer).generate(prompts, SamplingParams(), mode)`."""

from npr.engine.core import ParallelEngine
from npr.engine.params import FinishReason, Mode, ParamError, SamplingParams
from npr.engine.rollout import BlockRecord, BranchRecord, Rollout, RolloutStats, load_rollouts, save_rollouts

__all__ = [
    "BlockRecord",
    "BranchRecord",
    "FinishReason",
    "Mode",
    "ParallelEngine",
    "ParamError",
    "Rollout",
    "RolloutStats",
    "SamplingParams",
    "load_rollouts",
    "save_rollouts",
]
