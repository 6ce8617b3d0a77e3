"""The architecture record of one checkpoint (`ModelConfig`) and the helpers that read it from a
transformers config: what every family's `config_from_hf` builds on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ld_jax.errors import LdJaxError

Params = dict[str, Any]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type. `kind` is transformers' `rope_type`."""

    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


# ModelConfig fields that trade speed, memory or compile time but give the same results: caches
# keyed by a model's config leave them out (`result_fields`).
SPEED_OPTIONS = ("remat", "remat_offload", "unroll_layers")


def result_fields(config: ModelConfig) -> dict:
    """The config's fields that can change a result (all but SPEED_OPTIONS), for cache keys."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in SPEED_OPTIONS
    }


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one checkpoint, read from its config.json (see `loading.from_hf_config`).

    `layer_types[i]` is "full" or "sliding". Sliding layers see keys with
    `q_index - k_index < sliding_window` and use `rope_local`; full layers use `rope`.
    `remat`, `remat_offload`, `unroll_layers` and `dtype` are run options, not architecture: change them with
    `dataclasses.replace`. `unroll_layers` unrolls the layer scan: the same arithmetic, faster
    on XLA:CPU (see docs/performance.md), at a longer compile. `dtype` is the compute dtype of
    activations and matmuls; norms, softmax and logits are computed in float32 whatever it is.
    """

    family: str  # llama | gemma | gemma2 | gemma3 | olmo | olmo2
    model_type: str  # as in config.json
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    activation: str  # silu | gelu_tanh
    tie_embeddings: bool
    rope: RopeConfig
    layer_types: tuple[str, ...]
    attn_scale: float  # multiplies q.k
    rope_local: RopeConfig | None = None
    sliding_window: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    clip_qkv: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    remat: bool = False
    remat_offload: bool = False  # with remat: the saved layer inputs wait in host memory
    unroll_layers: bool = False
    dtype: str = "float32"
    attention: str = "auto"  # auto | plain | xla | cudnn (see core.attention)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def rope_config(params: dict, what: str) -> RopeConfig:
    """transformers v5 `rope_parameters` (one layer type) -> RopeConfig."""
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise LdJaxError(f"{what}: rope_type {kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=float(params["rope_theta"]),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def activation_name(hf_name: str) -> str:
    names = {
        "silu": "silu",
        "swish": "silu",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_new": "gelu_tanh",
    }
    if hf_name not in names:
        raise LdJaxError(f"hidden activation {hf_name!r} is not supported ({', '.join(names)})")
    return names[hf_name]


def common_fields(hf, family: str) -> dict:
    """ModelConfig fields that every family reads the same way from a transformers config."""
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise LdJaxError(f"{hf.model_type}: attention/MLP biases are not supported")
    eos = hf.eos_token_id
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        family=family,
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        d_ff=hf.intermediate_size,
        tie_embeddings=bool(hf.tie_word_embeddings),
        attn_scale=head_dim**-0.5,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=tuple(eos)
        if isinstance(eos, list | tuple)
        else (() if eos is None else (eos,)),
        pad_token_id=hf.pad_token_id,
    )
