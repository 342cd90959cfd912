"""Native parallel decoding: `load_engine(model, backend).generate(prompts, SamplingParams(), mode)`."""

from npr.engine.core import DecodingEngine, ParallelEngine
from npr.engine.handle import Engine, EngineStats, OpenBranch, RequestHandle, add_requests, run_to_completion
from npr.engine.loader import BACKENDS, load_engine
from npr.engine.params import FinishReason, Mode, ParamError, SamplingParams
from npr.engine.rollout import BlockRecord, BranchRecord, Rollout, RolloutStats, load_rollouts, save_rollouts

__all__ = [
    "BACKENDS",
    "BlockRecord",
    "BranchRecord",
    "DecodingEngine",
    "Engine",
    "EngineStats",
    "FinishReason",
    "Mode",
    "ParallelEngine",
    "OpenBranch",
    "ParamError",
    "RequestHandle",
    "Rollout",
    "RolloutStats",
    "SamplingParams",
    "add_requests",
    "load_engine",
    "load_rollouts",
    "run_to_completion",
    "save_rollouts",
]
