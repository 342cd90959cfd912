"""`npr pipeline CONFIG`: the whole method from one YAML file, every stage cached so a re-run resumes.

0. seed      a small model trained from scratch on the task family: sequential worked solutions plus
             noisy format attempts (never a clean parallel trace: the method stays teacher-free)
1. npr_zero  DAPO with sequential rollouts, format + accuracy reward (intermediate results checked)
2. rejection K sequential samples per problem from NPR-Zero; keep the first correct, well-formed one
   npr_beta  parallel SFT of the seed on the accepted traces;  sr_beta: the same data, causal SFT
3. npr       PAPO with native parallel rollouts from NPR-Beta;  sr: sequential RL from the seed
Then every model is evaluated on a held-out split and compared (`report.json`, `report.md`, plots, HTML).

A stage is done when its folder holds `done.json`; trainers resume from their own checkpoints, rejection
sampling from its JSONL, so a killed pipeline re-run with the same command picks up where it stopped.
`done.json` also records the stage's settings and a hash of what it read (weights, data): a re-run after
the config or an earlier stage changed stops with an error naming the stage, instead of reusing it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode

import yaml
from pydantic import BaseModel, ConfigDict, Field

from npr.data import Example, PromptStyle, build_prompt, load_task
from npr.files import atomic_write
from npr.tasks import TASKS

if TYPE_CHECKING:
    from npr.engine import Mode, SamplingParams
    from npr.eval.harness import PromptSpec

STAGES = ("seed", "npr_zero", "rejection", "npr_beta", "sr_beta", "npr", "sr")
MODELS = ("seed", "npr_zero", "npr_beta", "sr_beta", "sr", "npr")


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


class EvalSpec(_Strict):
    problems: int = Field(default=200, ge=1, description="Held-out problems (their own seed).")
    k: int = Field(default=4, ge=1, description="Samples per problem (avg@k).")
    temperature: float = Field(default=1.0, ge=0, description="Paper: 1.0.")
    top_p: float = Field(default=0.7, gt=0, le=1, description="Paper: 0.7.")
    max_new_tokens: int = Field(default=512, ge=1)
    latency_problems: int = Field(
        default=20, ge=1, description="Problems decoded one at a time (one sample each) to time latency."
    )
    latency_repeats: int = Field(
        default=1, ge=1, description="Times each problem is timed per model (the median is kept)."
    )


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
    from npr.train.config import ConfigError

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        config = PipelineConfig.model_validate({**raw, **overrides})
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from e
    seed = config.seed_model
    here = Path(path).resolve().parent
    paths = {  # relative to the config file
        key: str(here / value)
        for key in ("checkpoint", "init_from")
        if (value := getattr(seed, key)) and not Path(value).is_absolute()
    }
    return config.model_copy(update={"seed_model": seed.model_copy(update=paths)})


class StaleStageError(RuntimeError):
    """A cached stage was made with other settings or inputs than the current run would use."""


def content_hash(path: str | Path) -> str:
    """Short sha256 of a file, or of a model folder's weight files: what a stage read.

    >>> content_hash("no/such/file")
    'missing'
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not path.exists() or not files:
        return "missing"
    stats = [(str(f), f.stat()) for f in files]
    return _hash_files(tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats))


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed on path, mtime and size: a run hashes each model once however many caches check it."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _read_cached(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What a JSON cache holds (less its settings) if it was made with these settings, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.pop("settings", None) == json.loads(json.dumps(settings)) else None


def _write_cached(path: Path, content: dict[str, Any], settings: dict[str, Any]) -> None:
    atomic_write(path, json.dumps({**content, "settings": settings}))


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

    # ---------------------------------------------------------------------------------- bookkeeping

    def _done(self, stage: str) -> dict[str, Any] | None:
        path = self.run_dir / stage / "done.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _stage(
        self, stage: str, run: Callable[[Path], dict[str, Any]], settings: dict[str, Any]
    ) -> dict[str, Any]:
        settings = json.loads(json.dumps(settings))  # as it will read back from done.json
        folder = self.run_dir / stage
        done = self._done(stage)
        if done is not None:
            before = done.pop("settings", {})
            if before != settings:
                changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
                raise StaleStageError(
                    f"[{stage}] {folder} was made with other settings (changed: {', '.join(changed)}); "
                    f"delete it and the stages after it, or use another run_dir"
                )
            self.log(f"[{stage}] cached: {done}")
            return done
        self.log(f"[{stage}] running")
        folder.mkdir(parents=True, exist_ok=True)
        result = run(folder)
        atomic_write(folder / "done.json", json.dumps({**result, "settings": settings}, indent=2))
        return result

    def _data_settings(self) -> dict[str, Any]:
        """The settings that decide which problems and prompts a stage generates."""
        return {k: getattr(self.config, k) for k in ("task", "task_options", "seed", "prompt_style")}

    def problems(self, n: int, seed: int) -> list[Example]:
        """n problems of the configured task (with its options), reproducible from the seed."""
        return load_task(self.config.task, n, seed=seed, **self.config.task_options)

    def train_spec(self) -> str:
        c = self.config
        return f"task:{c.task}?" + urlencode({"n": c.train_problems, "seed": c.seed, **c.task_options})

    def eval_examples(self) -> list[Example]:
        return self.problems(self.config.eval.problems, seed=self.config.seed + 10_000)

    # ---------------------------------------------------------------------------------- stage 0

    def seed_data(self, path: Path, tokenizer: Any) -> None:
        """Sequential worked solutions (sequential prompt) and noisy format attempts (format prompt)."""
        from npr.tasks import noisy_attempt, sequential_solution

        c = self.config
        rng = random.Random(c.seed)
        lines = []
        for ex in self.problems(c.seed_model.examples, seed=c.seed + 20_000):
            noisy = rng.random() < c.seed_model.noisy_fraction
            if noisy:
                response = noisy_attempt(ex, rng)
            else:
                fraction = c.seed_model.shuffled_fraction
                shuffled = fraction > 0 and rng.random() < fraction  # no draw at 0: same data as before
                response = sequential_solution(ex, rng if shuffled else None)
            prompt = build_prompt(tokenizer, ex.question, parallel=noisy, style=c.prompt_style)
            lines.append(json.dumps({"question": ex.question, "response": response, "prompt_ids": prompt}))
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
        settings = {**self._data_settings(), "seed_model": c.model_dump(), "init_from": init}
        return str(self._stage("seed", run, settings)["model"])

    # ---------------------------------------------------------------------------------- stages 1-3

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
        """Build every stage's config now, so a typo fails at load, not an hour into the run."""
        self.problems(1, seed=0)  # a bad task option raises DataError naming it
        for stage in ("npr_zero", "npr", "sr"):
            self.rl_config(stage, "model")
        for stage in ("seed", "npr_beta", "sr_beta"):
            self.sft_config(stage, "model", "data.jsonl")

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
            from npr.engine import ParallelEngine, SamplingParams
            from npr.model import load_model
            from npr.train.rejection import rejection_sample

            model, tokenizer = load_model(npr_zero)
            problems = self.problems(spec.problems, seed=self.config.seed)
            out = folder / "accepted.jsonl"
            stats = rejection_sample(
                ParallelEngine(model, tokenizer),
                problems,
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

        settings = {**self._data_settings(), "rejection": spec.model_dump(), "model": content_hash(npr_zero)}
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
        """Train everything, evaluate everything, write the report; returns report.json's content."""
        from npr.report import write_report

        models = self.train_all()
        results = {name: self.evaluate(name, models[name]) for name in MODELS}
        for name, latency in self.latencies(models).items():
            results[name]["latency_solo_s"] = latency
        return write_report(self, models, results)

    # ---------------------------------------------------------------------------------- evaluation

    def _decoding(self, name: str) -> tuple[Mode, PromptSpec]:
        """How a model is decoded in the comparison: its mode and its prompts."""
        from npr.eval.harness import PromptSpec

        mode: Mode = "parallel" if name in ("npr_beta", "npr") else "sequential"
        # NPR-Zero writes the format while decoding sequentially: it is prompted as it was trained.
        prompt = PromptSpec(format=True if name == "npr_zero" else None, style=self.config.prompt_style)
        return mode, prompt

    def _eval_params(self) -> SamplingParams:
        from npr.eval.harness import paper_params

        spec = self.config.eval
        params = paper_params(
            spec.k, temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens
        )
        params.seed = self.config.seed
        return params

    def evaluate(self, name: str, model_path: str) -> dict[str, Any]:
        """avg@k accuracy (answer only), all-intermediates-correct rate and throughput of one model."""
        from npr.engine import ParallelEngine
        from npr.eval.harness import evaluate
        from npr.eval.report import load_summary
        from npr.model import load_model

        out = self.out_dir / name
        spec = self.config.eval
        cached = out / "intermediates.json"
        settings = {**self._data_settings(), "eval": spec.model_dump(), "model": content_hash(model_path)}
        if (extra := _read_cached(cached, settings)) is not None:
            self.log(f"[eval {name}] cached")
            return {"summary": load_summary(out), **extra}
        if cached.exists():
            self.log(f"[eval {name}] the model or eval settings changed: evaluating again")
        mode, prompt = self._decoding(name)
        model, tokenizer = load_model(model_path)
        examples = self.eval_examples()
        result = evaluate(
            ParallelEngine(model, tokenizer),
            examples,
            k=spec.k,
            params=self._eval_params(),
            mode=mode,
            out_dir=out,
            verifier=_answer_only,
            prompt=prompt,
            info={"model": model_path, "stage": name},
        )
        golds = [ex for ex in examples for _ in range(spec.k)]
        full = [self.task.check(r.text, ex) for r, ex in zip(result.run.rollouts, golds, strict=True)]
        extra = {"intermediates": sum(full) / len(full), "mode": mode}
        _write_cached(cached, extra, settings)
        return {"summary": load_summary(out), **extra}

    def latencies(self, models: dict[str, str]) -> dict[str, float]:
        """Mean single-request latency per model on the first eval problems, the models taking turns."""
        from npr.engine import ParallelEngine
        from npr.eval.harness import LatencyRun, solo_latencies
        from npr.model import load_model

        spec = self.config.eval
        cached = self.out_dir / "latency.json"
        hashes = {name: content_hash(path) for name, path in models.items()}
        settings = {**self._data_settings(), "eval": spec.model_dump(), "models": hashes}
        if (done := _read_cached(cached, settings)) is not None:
            self.log("[latency] cached")
            return done["latency_s"]
        self.log(f"[latency] {len(models)} models take turns on {spec.latency_problems} problems")
        runs = {}
        for name, path in models.items():
            model, tokenizer = load_model(path)
            runs[name] = LatencyRun(ParallelEngine(model, tokenizer), *self._decoding(name))
        problems = self.eval_examples()[: spec.latency_problems]
        times = solo_latencies(runs, problems, self._eval_params(), spec.latency_repeats)
        latency = {name: sum(t) / len(t) for name, t in times.items()}
        _write_cached(cached, {"latency_s": latency, "per_problem_s": times}, settings)
        return latency


def _answer_only(text: str, example: Example) -> bool:
    """The boxed answer equals the gold integer (accuracy; intermediate results are scored apart)."""
    from npr.format import extract_answer

    return (extract_answer(text) or "").strip() == example.answer
