"""Evaluation (DESIGN §7): `evaluate(engine, dataset, k=8)` decodes, scores and measures; `compare` tabulates."""

from npr.eval.harness import EvalResult, RunResult, evaluate, paper_params
from npr.eval.metrics import RunMetrics, Speedup, pass_at_k, run_metrics
from npr.eval.report import compare, load_summary, write_outputs, write_summary

__all__ = [
    "EvalResult",
    "RunMetrics",
    "RunResult",
    "Speedup",
    "compare",
    "evaluate",
    "load_summary",
    "paper_params",
    "pass_at_k",
    "run_metrics",
    "write_outputs",
    "write_summary",
]
