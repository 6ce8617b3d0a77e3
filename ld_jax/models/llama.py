"""Llama (Llama-2/3, SmolLM2, TinyLlama): pre-RMSNorm blocks, SwiGLU MLP, RoPE (incl. the
Llama-3.1 "llama3" scaling). Mirrors transformers' modeling_llama.py."""

from __future__ import annotations

import jax

from ld_jax.models import core
from ld_jax.models.config import ModelConfig, Params, activation_name, common_fields, rope_config
from ld_jax.models.core import LayerContext
from ld_jax.models.family import MATRIX_RULES, Family, invert_weights

# Our parameter path -> (HF tensor name, HF shape as ModelConfig fields). "{i}" is the layer
# index; paths under "layers/" are stacked on a leading [n_layers] axis, and their 2-D tensors
# are torch Linear weights [out, in], stored transposed as [in, out].
WEIGHTS = {
    "embed": ("model.embed_tokens.weight", ("vocab_size", "d_model")),
    "final_norm": ("model.norm.weight", ("d_model",)),
    "lm_head": ("lm_head.weight", ("vocab_size", "d_model")),
    "layers/attn_norm": ("model.layers.{i}.input_layernorm.weight", ("d_model",)),
    "layers/wq": ("model.layers.{i}.self_attn.q_proj.weight", ("q_dim", "d_model")),
    "layers/wk": ("model.layers.{i}.self_attn.k_proj.weight", ("kv_dim", "d_model")),
    "layers/wv": ("model.layers.{i}.self_attn.v_proj.weight", ("kv_dim", "d_model")),
    "layers/wo": ("model.layers.{i}.self_attn.o_proj.weight", ("d_model", "q_dim")),
    "layers/mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", ("d_model",)),
    "layers/w_gate": ("model.layers.{i}.mlp.gate_proj.weight", ("d_ff", "d_model")),
    "layers/w_up": ("model.layers.{i}.mlp.up_proj.weight", ("d_ff", "d_model")),
    "layers/w_down": ("model.layers.{i}.mlp.down_proj.weight", ("d_model", "d_ff")),
}
# The inverse, HF tensor name -> our path: what export writes (invert_weights).
EXPORT = invert_weights(WEIGHTS)


def config_from_hf(hf) -> ModelConfig:
    return ModelConfig(
        **common_fields(hf, "llama"),
        norm_eps=hf.rms_norm_eps,
        activation=activation_name(hf.hidden_act),
        rope=rope_config(hf.rope_parameters, hf.model_type),
        layer_types=("full",) * hf.num_hidden_layers,
    )


def block(config: ModelConfig, p: Params, x: jax.Array, ctx: LayerContext):
    """One decoder layer: x [batch, seq, d_model] -> (x [batch, seq, d_model], (k, v))."""
    h = core.rms_norm(x, p["attn_norm"], config.norm_eps)
    attn, kv = core.attend(*core.fused_matmul(h, p["wq"], p["wk"], p["wv"]), p, ctx, config)
    x = x + attn
    h = core.rms_norm(x, p["mlp_norm"], config.norm_eps)
    return x + core.gated_mlp(h, p, config.activation), kv


def hidden_states(config: ModelConfig, params: Params, input_ids, layout, cache=None):
    """input_ids [batch, seq], layout: core.TokenLayout [batch, seq] (position ids and the
    segments of the mask) -> (final hidden states [batch, seq, d_model], updated KVCache or
    None; see core.run_layers)."""
    x = core.embed(config, params, input_ids, scale=False)
    x, cache = core.run_layers(config, params, x, layout, block, cache)
    return core.rms_norm(x, params["final_norm"], config.norm_eps), cache


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    config_from_hf=config_from_hf,
    weight_table=WEIGHTS,
    export_table=EXPORT,
    hidden_states=hidden_states,
    partition_rules=MATRIX_RULES,
)
