"""`Pipeline`: the stages in order, each cached in its own folder and returning what the next one needs.

0. seed      a small model trained from scratch on the task family: sequential worked solutions plus
             noisy format attempts (never a clean parallel trace: the method stays teacher-free)
1. npr_zero  DAPO with sequential rollouts, format + accuracy reward (intermediate results checked)
2. rejection K sequential samples per problem from NPR-Zero; keep the first correct, well-formed one
   npr_beta  parallel SFT of the seed on the accepted traces;  sr_beta: the same data, causal SFT
3. npr       PAPO with native parallel rollouts from NPR-Beta;  sr: sequential RL from the seed
Then every model is evaluated on each held-out split and compared (`npr.pipeline.evaluation`, `.report`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from npr.data import build_prompt, load_task
from npr.example import Example
from npr.files import atomic_write
from npr.pipeline.cache import content_hash, run_stage
from npr.pipeline.config import MODELS, STAGES, PipelineConfig
from npr.tasks import TASKS, seed_corpus

EVAL_SEED_OFFSET, SEED_DATA_SEED_OFFSET = 10_000, 20_000
"""Held-out problems and the seed's corpus are drawn from their own seeds, apart from the training ones."""


class Pipeline:
    """Runs the stages in order; each returns what the next needs and is skipped when already done."""

    def __init__(
        self, config: PipelineConfig, *, from_scratch: bool = False, log: Callable[[str], None] = print
    ):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.out_dir = Path(config.out_dir)
        self.from_scratch = from_scratch
        self.log = log
        if config.task not in TASKS:
            raise ValueError(f"task {config.task!r} is not one of {sorted(TASKS)}")
        self.task = TASKS[config.task]
        self.validate()

    # ---------------------------------------------------------------------------------- data

    def data_settings(self) -> dict[str, Any]:
        """The settings that decide which problems and prompts a stage generates."""
        return {k: getattr(self.config, k) for k in ("task", "task_options", "seed", "prompt_style")}

    def problems(self, n: int, seed: int, **options: Any) -> list[Example]:
        """n problems of the configured task (its options, then `options` over them), reproducible."""
        return load_task(self.config.task, n, seed=seed, **{**self.config.task_options, **options})

    def train_spec(self) -> str:
        c = self.config
        return f"task:{c.task}?" + urlencode({"n": c.train_problems, "seed": c.seed, **c.task_options})

    def eval_examples(self, split: str | None = None) -> list[Example]:
        """The held-out problems of a split (default: the first, in-distribution one)."""
        splits = self.config.eval.splits
        options = splits[split if split is not None else next(iter(splits))]
        return self.problems(self.config.eval.problems, self.config.seed + EVAL_SEED_OFFSET, **options)

    # ---------------------------------------------------------------------------------- stage configs

    def rl_config(self, stage: str, model: str) -> Any:
        """The RLConfig of an RL stage (npr_zero: DAPO; npr: PAPO; sr: sequential PAPO-style)."""
        from npr.train.config import RLConfig

        algorithm = {"npr_zero": "dapo", "npr": "papo", "sr": "papo"}[stage]
        baseline = {"mode": "sequential"} if stage == "sr" else {}
        settings = {
            "model_path": model,
            "out_dir": str(self.run_dir / stage / "train"),
            "data": self.train_spec(),
            "algorithm": algorithm,
            "seed": self.config.seed,
            "prompt_style": self.config.prompt_style,
            **baseline,
            **getattr(self.config, stage),
        }
        return RLConfig.model_validate(settings)

    def sft_config(self, stage: str, model: str, data: str) -> Any:
        """The SFTConfig of a stage: the seed (causal, from scratch), npr_beta (parallel), sr_beta (causal)."""
        from npr.train.config import SFTConfig

        overrides = self.config.seed_model.sft if stage == "seed" else getattr(self.config, stage)
        settings = {
            "model_path": model,
            "data_path": data,
            "out_dir": str(self.run_dir / stage / "train"),
            "parallel": stage == "npr_beta",
            "seed": self.config.seed,
            "prompt_style": self.config.prompt_style,
            **overrides,
        }
        return SFTConfig.model_validate(settings)

    def validate(self) -> None:
        """Build every stage's config and split now, so a typo fails at load, not an hour into the run."""
        self.problems(1, seed=0)  # a bad task option raises DataError naming it
        for options in self.config.eval.splits.values():
            self.problems(1, seed=0, **options)
        for stage in ("npr_zero", "npr", "sr"):
            self.rl_config(stage, "model")
        for stage in ("seed", "npr_beta", "sr_beta"):
            self.sft_config(stage, "model", "data.jsonl")

    # ---------------------------------------------------------------------------------- stages

    def _stage(self, stage: str, run: Callable[[Path], dict[str, Any]], settings: dict[str, Any]) -> dict:
        return run_stage(self.run_dir / stage, run, settings, self.log)

    def seed_data(self, path: Path, tokenizer: Any) -> None:
        """The task's seed corpus as JSONL with prompt ids: solutions get the sequential prompt, noisy
        format attempts the format prompt."""
        c = self.config
        examples = self.problems(c.seed_model.examples, seed=c.seed + SEED_DATA_SEED_OFFSET)
        records = seed_corpus(
            examples,
            self.task.solution,
            self.task.noisy,
            seed=c.seed,
            noisy_fraction=c.seed_model.noisy_fraction,
            shuffled_fraction=c.seed_model.shuffled_fraction,
        )
        lines = [
            json.dumps(
                {
                    "question": r.question,
                    "response": r.response,
                    "prompt_ids": build_prompt(
                        tokenizer, r.question, parallel=r.parallel, style=c.prompt_style
                    ),
                }
            )
            for r in records
        ]
        atomic_write(path, "\n".join(lines) + "\n")

    def stage_seed(self) -> str:
        c = self.config.seed_model
        if c.checkpoint and not self.from_scratch:
            self.log(f"[seed] using the given checkpoint {c.checkpoint}")
            return c.checkpoint

        def run(folder: Path) -> dict[str, Any]:
            from npr.model import load_model, save_model, tiny_model
            from npr.train import sft

            if c.init_from:
                init = Path(c.init_from)
                tokenizer = load_model(init)[1]
            else:
                model, tokenizer = tiny_model(seed=self.config.seed, **c.init)
                init = folder / "init"
                if not init.exists():
                    save_model(model, tokenizer, init)
            data = folder / "data.jsonl"
            if not data.exists():
                self.seed_data(data, tokenizer)
            return {"model": str(sft.train(self.sft_config("seed", str(init), str(data))))}

        init = content_hash(c.init_from) if c.init_from else None
        settings = {**self.data_settings(), "seed_model": c.model_dump(), "init_from": init}
        return str(self._stage("seed", run, settings)["model"])

    def _rl(self, stage: str, model: str) -> str:
        def run(folder: Path) -> dict[str, Any]:
            from npr.train import rl

            return {"model": str(rl.train(self.rl_config(stage, model)))}

        settings = {
            "config": self.rl_config(stage, model).model_dump(mode="json"),
            "model": content_hash(model),
        }
        return str(self._stage(stage, run, settings)["model"])

    def _sft(self, stage: str, model: str, data: str) -> str:
        def run(folder: Path) -> dict[str, Any]:
            from npr.train import sft

            if not Path(data).exists() or not Path(data).read_text().strip():
                # Honest degenerate case (e.g. a seed too weak to yield one good trace): no training data.
                self.log(f"[{stage}] skipped: rejection sampling accepted no trace; the model stays {model}")
                return {"model": model, "skipped": "no accepted traces"}
            return {"model": str(sft.train(self.sft_config(stage, model, data)))}

        settings = {
            "config": self.sft_config(stage, model, data).model_dump(mode="json"),
            "model": content_hash(model),
            "data": content_hash(data),
        }
        return str(self._stage(stage, run, settings)["model"])

    def stage_rejection(self, npr_zero: str) -> str:
        spec = self.config.rejection

        def run(folder: Path) -> dict[str, Any]:
            from npr.engine import SamplingParams
            from npr.pipeline.evaluation import make_engine
            from npr.train.rejection import rejection_sample

            out = folder / "accepted.jsonl"
            stats = rejection_sample(
                make_engine(npr_zero, spec.backend),
                self.problems(spec.problems, seed=self.config.seed),
                out,
                k=spec.k,
                params=SamplingParams(temperature=spec.temperature, max_new_tokens=spec.max_new_tokens),
                seed=self.config.seed,
                check=self.task.check,
                prompt_style=self.config.prompt_style,
                progress=True,
            )
            self.log(f"[rejection] accepted {stats.accepted}/{stats.problems} problems")
            return {"data": str(out), "accepted": stats.accepted, "problems": stats.problems}

        settings = {**self.data_settings(), "rejection": spec.model_dump(), "model": content_hash(npr_zero)}
        return str(self._stage("rejection", run, settings)["data"])

    def train_all(self, until: str | None = None) -> dict[str, str]:
        """Every model of the comparison, trained (or found cached); `until` stops after that stage."""
        if until is not None and until not in STAGES:
            raise ValueError(f"until must be one of {STAGES}, got {until!r}")
        out: dict[str, str] = {}  # stage -> its model (rejection: its accepted traces)
        steps: list[tuple[str, Callable[[], str]]] = [
            ("seed", self.stage_seed),
            ("npr_zero", lambda: self._rl("npr_zero", out["seed"])),
            ("rejection", lambda: self.stage_rejection(out["npr_zero"])),
            ("npr_beta", lambda: self._sft("npr_beta", out["seed"], out["rejection"])),
            ("sr_beta", lambda: self._sft("sr_beta", out["seed"], out["rejection"])),
            ("npr", lambda: self._rl("npr", out["npr_beta"])),
            ("sr", lambda: self._rl("sr", out["seed"])),
        ]
        for stage, run in steps:
            out[stage] = run()
            if stage == until:
                break
        return {name: out[name] for name in MODELS if name in out}

    def run(self) -> dict[str, Any]:
        """Train everything, evaluate every model on every split, time them, write the report."""
        from npr.pipeline.evaluation import evaluate_model
        from npr.pipeline.latency import measure_latency
        from npr.pipeline.report import write_report

        models = self.train_all()
        splits = {name: self.eval_examples(name) for name in self.config.eval.splits}
        results = {
            split: {name: evaluate_model(self, name, models[name], split, examples) for name in MODELS}
            for split, examples in splits.items()
        }
        latency = measure_latency(self, models, splits)
        return write_report(self, models, results, latency)
