"""Gemma 1, 2 and 3 (text): RMSNorm scaled by (1 + w), embeddings times sqrt(d_model),
GeGLU (tanh-approximated GELU) MLP, tied embeddings. Gemma 2 adds post-norms around both
sublayers, attention-logit and final-logit softcapping, `query_pre_attn_scalar` and
alternating sliding-window / global layers; Gemma 3 replaces attention softcapping with
per-head q/k norms, reads its layer pattern from `layer_types` and gives sliding layers
their own RoPE base. Mirrors transformers' modeling_gemma{,2,3}.py."""

from __future__ import annotations

import functools

import jax

from ld_jax.errors import LdJaxError
from ld_jax.models import core, llama
from ld_jax.models.config import ModelConfig, Params, activation_name, common_fields, rope_config
from ld_jax.models.core import LayerContext
from ld_jax.models.family import MATRIX_RULES, Family, invert_weights

# Our parameter path -> (HF tensor name, HF shape as ModelConfig fields); conventions as in
# llama.WEIGHTS, whose projection and MLP names Gemma shares.
_SHARED = {k: v for k, v in llama.WEIGHTS.items() if k != "layers/mlp_norm"}
_LAYER = "model.layers.{i}."
WEIGHTS = {
    "gemma": {
        **_SHARED,
        "layers/mlp_norm": (_LAYER + "post_attention_layernorm.weight", ("d_model",)),
    },
    "gemma2": {
        **_SHARED,
        "layers/post_attn_norm": (_LAYER + "post_attention_layernorm.weight", ("d_model",)),
        "layers/mlp_norm": (_LAYER + "pre_feedforward_layernorm.weight", ("d_model",)),
        "layers/post_mlp_norm": (_LAYER + "post_feedforward_layernorm.weight", ("d_model",)),
    },
}
WEIGHTS["gemma3"] = {
    **WEIGHTS["gemma2"],
    "layers/q_norm": (_LAYER + "self_attn.q_norm.weight", ("head_dim",)),
    "layers/k_norm": (_LAYER + "self_attn.k_norm.weight", ("head_dim",)),
}
# The inverses, HF tensor name -> our path: what export writes (invert_weights). A
# multimodal Gemma 3 is exported as its text model (gemma3_text), so RENAMES are not inverted.
EXPORT = {name: invert_weights(table) for name, table in WEIGHTS.items()}
# Multimodal Gemma 3 checkpoints nest the text model (v5 and older layouts).
RENAMES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_FAMILY = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def config_from_hf(hf) -> ModelConfig:
    family = _FAMILY[hf.model_type]
    fields = common_fields(hf, family)
    n = hf.num_hidden_layers
    if family == "gemma":
        return ModelConfig(
            **fields,
            norm_eps=hf.rms_norm_eps,
            activation=activation_name(hf.hidden_act),
            rope=rope_config(hf.rope_parameters, hf.model_type),
            layer_types=("full",) * n,
        )
    if getattr(hf, "use_bidirectional_attention", False):
        raise LdJaxError(
            f"{hf.model_type}: bidirectional attention (embedding models) is not supported"
        )
    unknown = set(hf.layer_types) - set(_LAYER_TYPES)
    if unknown:
        raise LdJaxError(f"{hf.model_type}: unsupported layer_types {sorted(unknown)}")
    if family == "gemma3":
        rope = rope_config(hf.rope_parameters["full_attention"], hf.model_type)
        rope_local = rope_config(hf.rope_parameters["sliding_attention"], hf.model_type)
    else:
        rope, rope_local = rope_config(hf.rope_parameters, hf.model_type), None
    fields["attn_scale"] = hf.query_pre_attn_scalar**-0.5
    return ModelConfig(
        **fields,
        norm_eps=hf.rms_norm_eps,
        activation=activation_name(hf.hidden_activation),
        rope=rope,
        rope_local=rope_local,
        layer_types=tuple(_LAYER_TYPES[t] for t in hf.layer_types),
        sliding_window=hf.sliding_window,
        # transformers' Gemma 3 attention does not apply attn_logit_softcapping; neither do we.
        attn_softcap=hf.attn_logit_softcapping if family == "gemma2" else None,
        final_softcap=hf.final_logit_softcapping,
    )


def block(config: ModelConfig, p: Params, x: jax.Array, ctx: LayerContext):
    """One decoder layer: x [batch, seq, d_model] -> (x [batch, seq, d_model], (k, v))."""
    norm = functools.partial(core.rms_norm, eps=config.norm_eps, plus_one=True)
    head_norm = None
    if config.family == "gemma3":
        head_norm = lambda q, k: (norm(q, p["q_norm"]), norm(k, p["k_norm"]))  # noqa: E731
    h = norm(x, p["attn_norm"])
    attn, kv = core.attend(
        *core.fused_matmul(h, p["wq"], p["wk"], p["wv"]), p, ctx, config, head_norm
    )
    if config.family == "gemma":
        x = x + attn
        return x + core.gated_mlp(norm(x, p["mlp_norm"]), p, config.activation), kv
    x = x + norm(attn, p["post_attn_norm"])
    mlp = core.gated_mlp(norm(x, p["mlp_norm"]), p, config.activation)
    return x + norm(mlp, p["post_mlp_norm"]), kv


def hidden_states(config: ModelConfig, params: Params, input_ids, layout, cache=None):
    """input_ids [batch, seq], layout: core.TokenLayout [batch, seq] (position ids and the
    segments of the mask) -> (final hidden states [batch, seq, d_model], updated KVCache or
    None; see core.run_layers)."""
    x = core.embed(config, params, input_ids, scale=True)
    x, cache = core.run_layers(config, params, x, layout, block, cache)
    return core.rms_norm(x, params["final_norm"], config.norm_eps, plus_one=True), cache


def _family(name: str, model_types: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        config_from_hf=config_from_hf,
        weight_table=WEIGHTS[name],
        export_table=EXPORT[name],
        hidden_states=hidden_states,
        partition_rules=MATRIX_RULES,
        renames=RENAMES,
    )  # q_norm/k_norm of Gemma 3 are per head_dim: replicated by the last rule


# gemma3 is the multimodal wrapper: loading takes its text_config, a gemma3_text
GEMMA, GEMMA2, GEMMA3 = (
    _family("gemma", ("gemma",)),
    _family("gemma2", ("gemma2",)),
    _family("gemma3", ("gemma3_text", "gemma3")),
)
