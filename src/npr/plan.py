"""Memory at scale: what one GPU holds when a training config runs on N GPUs (`npr plan`, DESIGN §5).

The model is built on the meta device from its Hugging Face config (no weights are read), so a 4B plan
runs on a laptop. Per GPU, for `ddp` and `fsdp` and for `dense` and `flex` attention:

- parameters, gradients: parameter count × bytes of `dtype`; FSDP divides them by N;
- optimizer: AdamW's two moments in `dtype`, divided by N under FSDP;
- activations: what backward keeps for one micro-batch of T tokens. Per decoder layer and token it keeps
  the two norm inputs (2h), q, k, v (h_q + 2 h_kv), the attention output (h_q) and the MLP's gate, up and
  activation (3 I), in the compute dtype (bf16 under `precision: bf16`). With activation checkpointing only
  each layer's input (h) is kept, plus one layer's full set during its recomputation;
- logits: T × vocab in the compute dtype plus their float32 log-softmax (the loss is float32);
- mask: dense attention holds one additive `[rows, 1, L, L]` mask in the compute dtype; flex a BlockMask of
  about 4 int32 entries per 128×128 tile, (L/128)² per row.

Not counted: the CUDA context, allocator fragmentation, temporary buffers of kernels, and under FSDP the
one or two gathered layers in flight (added as two layers' parameters in the compute dtype). Treat the
total as a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: counted on the meta device."""

    params: int
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    layer_params: int  # parameters of one decoder layer


def model_shape(model_config: Any) -> ModelShape:
    """Build the model from its config on the meta device and count its parameters."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    c = model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer = next(m for m in model.modules() if type(m).__name__ in set(model._no_split_modules))
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        q_dim=c.num_attention_heads * head_dim,
        kv_dim=c.num_key_value_heads * head_dim,
        intermediate=c.intermediate_size,
        vocab=c.vocab_size,
        layer_params=sum(p.numel() for p in layer.parameters()),
    )


@dataclass(frozen=True)
class Workload:
    """One forward pass of the config: its rows and their length, and the settings that size memory."""

    rows: int
    row_tokens: int
    dtype: str
    precision: str
    activation_checkpointing: bool

    @property
    def tokens(self) -> int:
        return self.rows * self.row_tokens

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else _BYTES[self.dtype]


def workload(config: Any, prompt_tokens: int = 1024) -> Workload:
    """The micro-batch a training config runs: packed rows (`max_tokens_per_row`, `micro_batch_tokens`)
    or padded sequences; an RL row is `prompt_tokens` + `max_new_tokens` long at most."""
    longest = config.max_len if config.kind == "sft" else prompt_tokens + config.max_new_tokens
    if config.packing:
        row = config.max_tokens_per_row or longest
        rows = max(1, config.micro_batch_tokens // row)
    else:
        row = longest
        rows = config.batch_size if config.kind == "sft" else config.micro_batch_size
    return Workload(rows, row, config.dtype, config.precision, config.activation_checkpointing)


def estimate(
    shape: ModelShape, work: Workload, gpus: int, distributed: str, attention: str
) -> dict[str, float]:
    """Bytes per GPU by part, and their total (see the module docstring for each formula)."""
    store = _BYTES[work.dtype]
    shard = gpus if distributed == "fsdp" else 1
    c, t = work.compute_bytes, work.tokens
    per_token_layer = 2 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate
    if work.activation_checkpointing:
        activations = c * t * (shape.layers * shape.hidden + per_token_layer)
    else:
        activations = c * t * shape.layers * per_token_layer
    tiles = -(-work.row_tokens // 128)
    mask = work.rows * (work.row_tokens**2 * c if attention == "dense" else 4 * 4 * tiles**2)
    parts = {
        "params": shape.params * store / shard,
        "grads": shape.params * store / shard,
        "optimizer": 2 * shape.params * store / shard,
        "gathered": 2 * shape.layer_params * c if distributed == "fsdp" else 0.0,
        "activations": float(activations),
        "logits": float(t * shape.vocab * (c + 4)),
        "mask": float(mask),
    }
    parts["total"] = sum(parts.values())
    return parts


def plan_table(
    config: Any, shape: ModelShape, gpus: int, gpu_mem_gib: float, prompt_tokens: int = 1024
) -> list[dict[str, Any]]:
    """One row per (distributed, attention): GiB per GPU by part, the total, and whether it fits."""
    work = workload(config, prompt_tokens)
    rows = []
    for distributed in ("ddp", "fsdp"):
        for attention in ("dense", "flex"):
            parts = estimate(shape, work, gpus, distributed, attention)
            gib = {name: value / GIB for name, value in parts.items()}
            rows.append(
                {
                    "distributed": distributed,
                    "attention": attention,
                    **gib,
                    "fits": gib["total"] <= gpu_mem_gib,
                }
            )
    return rows


def load_model_config(config: Any, model_config: str | Path | None) -> Any:
    """The HF config of the model to plan: `model_config` (a config.json or a folder), else the training
    config's `model_path` folder."""
    from transformers import AutoConfig

    source = Path(model_config or config.model_path)
    folder = source.parent if source.name == "config.json" else source
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    raise FileNotFoundError(
        f"{source}: no config.json to build the model from; pass --model-config (e.g. configs/paper/qwen3-4b)"
    )
