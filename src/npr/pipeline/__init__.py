"""`npr pipeline CONFIG`: the whole method from one YAML file, every stage cached so a re-run resumes.

config      the YAML schema (`PipelineConfig`, `load_pipeline_config`)
cache       stage folders and evaluation caches that are reused only with the same settings and inputs
stages      `Pipeline`: seed, NPR-Zero, rejection, NPR-Beta, SR-Beta, NPR, SR
evaluation  a model on a held-out split: accuracy and all-steps-right per problem
latency     single-request timing, repeated and interleaved, with its spread and the machine's load
stats       bootstrap intervals over problems
report      report.json / report.md (tables with intervals, significant differences); figures: curves, samples
"""

from npr.pipeline.cache import StaleStageError, content_hash
from npr.pipeline.config import (
    MODELS,
    STAGES,
    EvalSpec,
    PipelineConfig,
    RejectionSpec,
    SeedSpec,
    load_pipeline_config,
)
from npr.pipeline.stages import Pipeline

__all__ = [
    "MODELS",
    "STAGES",
    "EvalSpec",
    "Pipeline",
    "PipelineConfig",
    "RejectionSpec",
    "SeedSpec",
    "StaleStageError",
    "content_hash",
    "load_pipeline_config",
]
