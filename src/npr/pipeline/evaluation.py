"""How the pipeline evaluates a model on a split: its decoding mode and prompt, avg@k accuracy (answer only)
and the share of answers with every intermediate result right, per problem (for the report's intervals).

`make_engine` is the one place the pipeline builds an inference engine (evaluation, latency, rejection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from npr.example import Example
from npr.pipeline.cache import content_hash, read_cached, write_cached

if TYPE_CHECKING:
    from npr.engine import Engine, Mode, SamplingParams
    from npr.eval.harness import PromptSpec
    from npr.pipeline.stages import Pipeline

PARALLEL_MODELS = ("npr_beta", "npr")


def make_engine(model_path: str, backend: str = "hf") -> Engine:
    """An engine over a saved model (the pipeline's only engine construction)."""
    from npr.engine import load_engine

    return load_engine(model_path, backend)


def decoding(name: str, style: Any) -> tuple[Mode, PromptSpec]:
    """How a model is decoded in the comparison: its mode and its prompts."""
    from npr.eval.harness import PromptSpec

    mode: Mode = "parallel" if name in PARALLEL_MODELS else "sequential"
    # NPR-Zero writes the format while decoding sequentially: it is prompted as it was trained.
    return mode, PromptSpec(format=True if name == "npr_zero" else None, style=style)


def eval_params(pipeline: Pipeline) -> SamplingParams:
    """The evaluation's sampling settings (paper: T 1.0, top-p 0.7), seeded by the run's seed."""
    from npr.eval.harness import paper_params

    spec = pipeline.config.eval
    params = paper_params(
        spec.k, temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens
    )
    params.seed = pipeline.config.seed
    return params


def answer_only(text: str, example: Example) -> bool:
    """The boxed answer equals the gold integer (accuracy; intermediate results are scored apart)."""
    from npr.format import extract_answer

    return (extract_answer(text) or "").strip() == example.answer


def per_problem(flags: Sequence[bool], k: int) -> list[float]:
    """Per problem, the share of its k samples (problem-major) that pass.

    >>> per_problem([True, False, True, True], 2)
    [0.5, 1.0]
    """
    return [sum(flags[i : i + k]) / k for i in range(0, len(flags), k)]


def evaluate_model(
    pipeline: Pipeline, name: str, model_path: str, split: str, examples: list[Example]
) -> dict[str, Any]:
    """One model on one split: the harness summary plus per-problem accuracy and all-steps-right rates.

    Cached under `OUT_DIR/<split>/<model>/`; a changed model or eval setting evaluates again.
    """
    from npr.eval.harness import evaluate
    from npr.eval.report import load_summary

    out = pipeline.out_dir / split / name
    spec = pipeline.config.eval
    cached = out / "per_problem.json"
    settings = {
        **pipeline.data_settings(),
        "eval": spec.model_dump(),
        "split": split,
        "model": content_hash(model_path),
    }
    tag = f"[eval {split} {name}]"
    if (extra := read_cached(cached, settings)) is not None:
        pipeline.log(f"{tag} cached")
        return {"summary": load_summary(out), **extra}
    if cached.exists():
        pipeline.log(f"{tag} the model or eval settings changed: evaluating again")
    pipeline.log(f"{tag} {len(examples)} problems × {spec.k}")
    mode, prompt = decoding(name, pipeline.config.prompt_style)
    result = evaluate(
        make_engine(model_path, spec.backend),
        examples,
        k=spec.k,
        params=eval_params(pipeline),
        mode=mode,
        out_dir=out,
        verifier=answer_only,
        prompt=prompt,
        info={"model": model_path, "stage": name, "split": split},
    )
    golds = [ex for ex in examples for _ in range(spec.k)]
    texts = [r.text for r in result.run.rollouts]
    extra = {
        "mode": mode,
        "accuracy": per_problem([answer_only(t, ex) for t, ex in zip(texts, golds, strict=True)], spec.k),
        "intermediates_correct": per_problem(
            [pipeline.task.check(t, ex) for t, ex in zip(texts, golds, strict=True)], spec.k
        ),
    }
    write_cached(cached, extra, settings)
    return {"summary": load_summary(out), **extra}
