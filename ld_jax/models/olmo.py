"""OLMo (original OLMo-1B, HF model_type "olmo") and OLMo 2 ("olmo2").

OLMo: pre-norm blocks with a LayerNorm that has no weight or bias (eps 1e-5, fixed), SwiGLU,
optional clipping of the q/k/v projections to [-clip_qkv, clip_qkv].
OLMo 2: no input norms; RMSNorm *after* attention and after the MLP (inside the residual
branch) and RMSNorm of q and k over the whole projection (all heads at once).
Mirrors transformers' modeling_olmo.py and modeling_olmo2.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ld_jax.models import core
from ld_jax.models.config import ModelConfig, Params, activation_name, common_fields, rope_config
from ld_jax.models.core import LayerContext
from ld_jax.models.family import MATRIX_RULES, Family, invert_weights

_LAYER = "model.layers.{i}."
# Our parameter path -> (HF tensor name, HF shape as ModelConfig fields); conventions as in
# llama.WEIGHTS. OLMo-1B has no norm parameters at all.
_PROJECTIONS = {
    "embed": ("model.embed_tokens.weight", ("vocab_size", "d_model")),
    "lm_head": ("lm_head.weight", ("vocab_size", "d_model")),
    "layers/wq": (_LAYER + "self_attn.q_proj.weight", ("q_dim", "d_model")),
    "layers/wk": (_LAYER + "self_attn.k_proj.weight", ("kv_dim", "d_model")),
    "layers/wv": (_LAYER + "self_attn.v_proj.weight", ("kv_dim", "d_model")),
    "layers/wo": (_LAYER + "self_attn.o_proj.weight", ("d_model", "q_dim")),
    "layers/w_gate": (_LAYER + "mlp.gate_proj.weight", ("d_ff", "d_model")),
    "layers/w_up": (_LAYER + "mlp.up_proj.weight", ("d_ff", "d_model")),
    "layers/w_down": (_LAYER + "mlp.down_proj.weight", ("d_model", "d_ff")),
}
WEIGHTS = {
    "olmo": _PROJECTIONS,
    "olmo2": {
        **_PROJECTIONS,
        "final_norm": ("model.norm.weight", ("d_model",)),
        "layers/q_norm": (_LAYER + "self_attn.q_norm.weight", ("q_dim",)),
        "layers/k_norm": (_LAYER + "self_attn.k_norm.weight", ("kv_dim",)),
        "layers/post_attn_norm": (_LAYER + "post_attention_layernorm.weight", ("d_model",)),
        "layers/post_mlp_norm": (_LAYER + "post_feedforward_layernorm.weight", ("d_model",)),
    },
}
# The inverses, HF tensor name -> our path: what export writes (invert_weights).
EXPORT = {name: invert_weights(table) for name, table in WEIGHTS.items()}
_OLMO_LAYER_NORM_EPS = 1e-5  # hard-coded in OLMo-1B


def config_from_hf(hf) -> ModelConfig:
    family = hf.model_type  # "olmo" or "olmo2"
    return ModelConfig(
        **common_fields(hf, family),
        norm_eps=_OLMO_LAYER_NORM_EPS if family == "olmo" else hf.rms_norm_eps,
        activation=activation_name(hf.hidden_act),
        rope=rope_config(hf.rope_parameters, hf.model_type),
        layer_types=("full",) * hf.num_hidden_layers,
        clip_qkv=hf.clip_qkv if family == "olmo" else None,
    )


def _olmo_block(config: ModelConfig, p: Params, x: jax.Array, ctx: LayerContext):
    h = core.layer_norm(x, config.norm_eps)
    q, k, v = core.fused_matmul(h, p["wq"], p["wk"], p["wv"])
    if config.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -config.clip_qkv, config.clip_qkv) for t in (q, k, v))
    attn, kv = core.attend(q, k, v, p, ctx, config)
    x = x + attn
    return x + core.gated_mlp(core.layer_norm(x, config.norm_eps), p, config.activation), kv


def _olmo2_block(config: ModelConfig, p: Params, x: jax.Array, ctx: LayerContext):
    eps = config.norm_eps
    q, k, v = core.fused_matmul(x, p["wq"], p["wk"], p["wv"])
    q, k = core.rms_norm(q, p["q_norm"], eps), core.rms_norm(k, p["k_norm"], eps)
    attn, kv = core.attend(q, k, v, p, ctx, config)
    x = x + core.rms_norm(attn, p["post_attn_norm"], eps)
    return x + core.rms_norm(core.gated_mlp(x, p, config.activation), p["post_mlp_norm"], eps), kv


def hidden_states(config: ModelConfig, params: Params, input_ids, layout, cache=None):
    """input_ids [batch, seq], layout: core.TokenLayout [batch, seq] (position ids and the
    segments of the mask) -> (final hidden states [batch, seq, d_model], updated KVCache or
    None; see core.run_layers)."""
    x = core.embed(config, params, input_ids, scale=False)
    if config.family == "olmo":
        x, cache = core.run_layers(config, params, x, layout, _olmo_block, cache)
        return core.layer_norm(x, config.norm_eps), cache
    x, cache = core.run_layers(config, params, x, layout, _olmo2_block, cache)
    return core.rms_norm(x, params["final_norm"], config.norm_eps), cache


# OLMo 2 normalises q and k over the whole projection, so its norms follow wq/wk's outputs
_OLMO2_RULES = ((r"(^|/)layers/(q_norm|k_norm)$", P(None, "tensor")),) + MATRIX_RULES
OLMO, OLMO2 = (
    Family(
        name=name,
        model_types=(name,),
        config_from_hf=config_from_hf,
        weight_table=WEIGHTS[name],
        export_table=EXPORT[name],
        hidden_states=hidden_states,
        partition_rules=rules,
    )
    for name, rules in (("olmo", MATRIX_RULES), ("olmo2", _OLMO2_RULES))
)
