"""Shared pure building blocks of the decoder-only families: norms, RoPE, masked attention,
gated MLP, and the layer scan that every family runs. The architecture record is
`models/config.py`; what a family is, `models/family.py`.

Parameters are plain nested dicts. Per-layer parameters are stacked on a leading `[n_layers]`
axis so that one `jax.lax.scan` runs all layers (compile time does not grow with depth).
Linear weights are stored `[in, out]` (the transpose of torch's `nn.Linear.weight`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ld_jax.models.config import ModelConfig, Params, RopeConfig
from ld_jax.models.constraints import constrain_batch

LAYER_INPUT = "layer_input"


class Output(NamedTuple):
    logits: jax.Array  # [batch, seq, vocab] float32
    hidden: jax.Array  # [batch, seq, d_model] after the final norm


class LayerContext(NamedTuple):
    """What a decoder block needs besides its parameters, for one layer of the scan.

    With a KV cache (generation), `kv` is this layer's cached (k, v), each
    [batch, max_len, n_kv_heads, head_dim], the new keys/values are written at slot `index`,
    and `mask` is [batch, seq, max_len] over the cache slots."""

    cos: jax.Array  # [batch, seq, head_dim] float32
    sin: jax.Array  # [batch, seq, head_dim] float32
    mask: jax.Array  # [batch, seq_q, seq_k] bool, True = may attend
    kv: tuple[jax.Array, jax.Array] | None = None
    index: jax.Array | None = None  # [] int32


class KVCache(NamedTuple):
    """Keys and values of every layer for generation. Slot t holds the token at index t of
    the padded sequence: the (left-padded) prompt first, then one slot per generated token.
    Sliding-window layers keep all slots too and mask by distance, as in the full forward."""

    k: jax.Array  # [n_layers, batch, max_len, n_kv_heads, head_dim] compute dtype, after RoPE
    v: jax.Array  # [n_layers, batch, max_len, n_kv_heads, head_dim]
    mask: jax.Array  # [batch, max_len] int32: 1 where a real (non-pad) token has been written
    index: jax.Array  # [] int32: the next slot to write


# ---------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """x [..., d] -> same shape and dtype; statistics and scaling in float32.

    Gemma stores the scale as an offset from one (`x * (1 + w)`), Llama and OLMo 2 as `x * w`.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    return (normed * (1.0 + scale if plus_one else scale)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Non-parametric LayerNorm (OLMo-1B): x [..., d] -> same shape, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """RoPE inverse frequencies [head_dim // 2] float32, as transformers' ROPE_INIT_FUNCTIONS."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [batch, seq] int, inv_freq [head_dim/2] -> cos, sin [batch, seq, head_dim] f32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, heads, head_dim] rotated in float32 (rotate-half convention of HF)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def attention(q, k, v, mask, scale: float, softcap: float | None = None, impl="plain"):
    """Grouped-query attention.

    q [batch, seq, n_heads, head_dim]; k, v [batch, seq_k, n_kv_heads, head_dim];
    mask [batch, seq, seq_k] bool -> [batch, seq, n_heads, head_dim].
    Query head h reads key/value head h // (n_heads // n_kv_heads), as transformers' repeat_kv.
    impl: "plain" (this einsum softmax; always with a softcap), "xla" or "cudnn" (the kernels of
    `jax.nn.dot_product_attention`), or "auto": `dot_product_attention` on a GPU or TPU where
    it applies, the plain form elsewhere and as the fallback.
    """
    if impl == "auto":
        impl = "plain" if jax.default_backend() == "cpu" else "fused"
    if impl != "plain" and softcap is None:
        try:
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask[:, None],  # [batch, 1, seq, seq_k]: the same for every head
                scale=scale,
                implementation=None if impl == "fused" else impl,
            )
        except (NotImplementedError, ValueError, TypeError):
            pass  # the kernel does not take these shapes or dtypes: the plain form below
    b, s, n_heads, hd = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, s, n_kv, n_heads // n_kv, hd)
    scores = jnp.einsum("bskgh,btkh->bkgst", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    # A finite floor, not -inf: padded query rows with no visible key must not produce NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkh->bskgh", probs, v)
    return out.reshape(b, s, n_heads, hd)


FUSE_MIN_ROWS = 64  # fused_matmul concatenates the weights only from this many rows on


def fused_matmul(x: jax.Array, *weights: jax.Array) -> tuple[jax.Array, ...]:
    """x [..., d_in] and weights [d_in, d_i] -> (x @ w for each w), shapes [..., d_i].

    One dot against the weights concatenated on the output axis instead of one dot each:
    XLA:CPU runs the single wider matmul (and its two backward dots) faster than several
    narrow ones over the same input; each output column is the same dot product as before.
    With few rows (a decode step) the concatenation would copy more bytes than the matmul
    reads, so the dots stay separate there.
    """
    rows = math.prod(x.shape[:-1])
    if len(weights) == 1 or rows < FUSE_MIN_ROWS:
        return tuple(x @ w for w in weights)
    out = x @ jnp.concatenate(weights, axis=1)
    return tuple(jnp.split(out, np.cumsum([w.shape[1] for w in weights])[:-1].tolist(), axis=-1))


def gated_mlp(x: jax.Array, p: Params, activation: str) -> jax.Array:
    """x [batch, seq, d_model] -> [batch, seq, d_model]: down(act(gate(x)) * up(x))."""
    gate, up = fused_matmul(x, p["w_gate"], p["w_up"])
    act = jax.nn.silu(gate) if activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return (act * up) @ p["w_down"]


def split_heads(t: jax.Array, head_dim: int) -> jax.Array:
    """[batch, seq, heads * head_dim] -> [batch, seq, heads, head_dim]."""
    return t.reshape(*t.shape[:-1], -1, head_dim)


def attend(q, k, v, p: Params, ctx: LayerContext, config: ModelConfig, head_norm=None):
    """Self-attention sublayer after the projections.

    q [batch, seq, q_dim], k, v [batch, seq, kv_dim] -> (out [batch, seq, d_model] after
    o_proj, (k, v)): the keys (after RoPE) and values that the queries attended to, each
    [batch, seq_k, n_kv_heads, head_dim]; with a cache in `ctx` that is the updated cache.
    `head_norm(q, k)` (Gemma 3's per-head q/k norms) runs on [batch, seq, heads, head_dim]
    before RoPE."""
    q, k, v = (split_heads(t, config.head_dim) for t in (q, k, v))
    if head_norm is not None:
        q, k = head_norm(q, k)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if ctx.kv is not None:
        k, v = (
            jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), ctx.index, axis=1)
            for cached, new in zip(ctx.kv, (k, v))
        )
    out = attention(q, k, v, ctx.mask, config.attn_scale, config.attn_softcap, config.attention)
    return out.reshape(*out.shape[:2], -1) @ p["wo"], (k, v)


# ---------------------------------------------------------------- masks and the layer scan


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[batch, seq] 0/1 -> position ids [batch, seq]: cumsum - 1, clipped at 0 (left or right
    padding both give 0, 1, 2, ... on the real tokens)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class TokenLayout(NamedTuple):
    """Where each token of a row sits: what the model needs besides the ids.

    segments: 0 on padding, 1 on tokens that every later token may see (a prompt, or a whole
    unpacked sequence), k >= 2 on the tokens of segment k, which see the 1-tokens and their
    own segment only (`ld_jax.data.batch`: y+ = 2 and y− = 3 packed after one prompt).
    positions: the RoPE position ids (in a packed row y− restarts after the prompt)."""

    positions: jax.Array  # [batch, seq] int32
    segments: jax.Array  # [batch, seq] int32


def padding_layout(attention_mask: jax.Array) -> TokenLayout:
    """One sequence per row with padding (either side): attention_mask [batch, seq] 0/1."""
    return TokenLayout(positions_from_mask(attention_mask), attention_mask.astype(jnp.int32))


def attention_masks(layout: TokenLayout, sliding_window: int | None):
    """TokenLayout [batch, seq] -> (full, sliding) [batch, seq, seq] bool masks; sliding is None
    when the model has no sliding layers. A query sees the earlier keys (token order) of
    segment 1 and of its own segment, never padding; the sliding window is in position ids,
    which within what a query sees equals the distance in an unpacked row (as transformers)."""
    s = layout.segments.shape[-1]
    seg_q, seg_k = layout.segments[:, :, None], layout.segments[:, None, :]
    causal = (jnp.arange(s)[None, :] <= jnp.arange(s)[:, None])[None]
    full = causal & (seg_k != 0) & ((seg_k == 1) | (seg_k == seg_q))
    if sliding_window is None:
        return full, None
    distance = layout.positions[:, :, None] - layout.positions[:, None, :]
    return full, full & (distance < sliding_window)


def cast_params(params: Params, dtype) -> Params:
    """All parameters in the compute dtype (a no-op under jit when they already are); mixed
    precision training keeps float32 master weights and differentiates through this cast."""
    return jax.tree.map(lambda p: p.astype(dtype), params)


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty KVCache with `max_len` slots (prompt length + new tokens)."""
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, config.dtype)
    return KVCache(zeros, zeros, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def cache_masks(attention_mask: jax.Array, cache: KVCache, sliding_window: int | None):
    """New tokens' attention_mask [batch, seq] written at `cache.index` -> (positions
    [batch, seq], full and sliding [batch, seq, max_len] bool masks, new key mask
    [batch, max_len]). Positions continue each row's count of real tokens, so left padding
    gives the same positions as `positions_from_mask` on the whole sequence."""
    s, max_len = attention_mask.shape[-1], cache.mask.shape[-1]
    new = attention_mask.astype(jnp.int32)
    key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new, cache.index, axis=1)
    positions = jnp.maximum(jnp.sum(cache.mask, -1, keepdims=True) + jnp.cumsum(new, -1) - 1, 0)
    q_idx = cache.index + jnp.arange(s)[:, None]
    k_idx = jnp.arange(max_len)[None, :]
    full = (k_idx <= q_idx)[None] & key_mask.astype(bool)[:, None, :]
    sliding = None if sliding_window is None else full & (q_idx - k_idx < sliding_window)[None]
    return positions, full, sliding, key_mask


# A decoder layer: (config, layer params, x [batch, seq, d_model], ctx) -> (x, (k, v) from attend).
Block = Callable[[ModelConfig, Params, jax.Array, LayerContext], tuple[jax.Array, tuple]]


def run_layers(
    config: ModelConfig, params: Params, x: jax.Array, layout: TokenLayout, block: Block, cache=None
):
    """Scan `block` over the stacked layers.

    x [batch, seq, d_model] embeddings, layout: the TokenLayout [batch, seq] (positions and
    the segments the mask is built from) -> (x [batch, seq, d_model] residual stream before
    the final norm, updated KVCache or None). Per-layer RoPE frequencies and the sliding/full
    flag are scanned arrays, so Gemma 2/3's alternating layers need no Python branching.
    With `cache`, the seq new tokens (segments 0/1: padding or real) are written at slots
    `cache.index ...` and attend to every earlier real slot (prefill: an empty cache at index
    0; decode: one token per row); positions then continue the cache's count.
    """
    if cache is None:
        positions = layout.positions
        full_mask, sliding_mask = attention_masks(layout, config.sliding_window)
    else:
        attention_mask = (layout.segments != 0).astype(jnp.int32)
        positions, full_mask, sliding_mask, key_mask = cache_masks(
            attention_mask, cache, config.sliding_window
        )
    local = config.rope_local or config.rope
    is_sliding = np.array([t == "sliding" for t in config.layer_types])
    inv_freq = np.stack(
        [inv_frequencies(local if sl else config.rope, config.head_dim) for sl in is_sliding]
    )  # [n_layers, head_dim/2]

    def body(h, xs):
        layer_params, layer_inv_freq, layer_is_sliding, kv = xs
        h = checkpoint_name(h, LAYER_INPUT)  # what remat saves: the layer's input
        cos, sin = rope_tables(positions, layer_inv_freq)
        mask = (
            full_mask
            if sliding_mask is None
            else jnp.where(layer_is_sliding, sliding_mask, full_mask)
        )
        index = None if cache is None else cache.index
        # the residual stream stays split over the batch axes under jit (models/constraints.py)
        h, new_kv = block(
            config, layer_params, constrain_batch(h), LayerContext(cos, sin, mask, kv, index)
        )
        h = constrain_batch(h)
        # Without a cache the per-layer k/v are not scan outputs, so XLA drops them.
        return h, (None if cache is None else new_kv)

    if config.remat:
        body = jax.checkpoint(body, prevent_cse=False, policy=_remat_policy(config))
    kv = None if cache is None else (cache.k, cache.v)
    xs = (params["layers"], jnp.asarray(inv_freq), jnp.asarray(is_sliding), kv)
    # Unrolled, XLA:CPU drops the per-layer dynamic slices of the stacked weights and
    # residuals that a rolled loop copies (see docs/performance.md).
    x, new_kv = jax.lax.scan(body, x, xs, unroll=config.n_layers if config.unroll_layers else 1)
    if cache is None:
        return x, None
    return x, KVCache(*new_kv, key_mask, cache.index + attention_mask.shape[-1])


def _remat_policy(config: ModelConfig):
    """remat saves each layer's input; with `remat_offload` it waits for the backward pass in
    host memory (`[n_layers, batch, seq, d_model]` leaves the accelerator: docs/scaling.md)."""
    if not config.remat_offload:
        return None  # nothing saved inside a layer: the scan keeps its inputs on the device
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    )


def embed(config: ModelConfig, params: Params, input_ids: jax.Array, scale: bool) -> jax.Array:
    """input_ids [batch, seq] -> [batch, seq, d_model]; Gemma multiplies by sqrt(d_model),
    rounded to the embedding dtype first as transformers does."""
    x = jnp.take(params["embed"], input_ids, axis=0)
    if config.pad_token_id is not None:
        # transformers builds every family's embedding with padding_idx=pad_token_id, so a
        # lookup of that row passes no gradient to it (a tied LM head still does). SmolLM2's
        # pad is <|im_end|>, a real token of every chat prompt: without this its row's
        # gradient differs from transformers' by 5e-4 of the whole embedding's.
        pad = (input_ids == config.pad_token_id)[..., None]
        x = jnp.where(pad, jax.lax.stop_gradient(x), x)
    if scale:
        x = x * jnp.asarray(math.sqrt(config.d_model), dtype=x.dtype)
    return x


def unembedding(config: ModelConfig, params: Params) -> jax.Array:
    """W [vocab, d_model]: the tied embedding or the separate LM head."""
    return params["embed"] if config.tie_embeddings else params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """hidden [..., d_model] -> logits [..., vocab] float32, with Gemma 2/3 final softcapping.

    Callers may pass a slice of positions (or of W via their own matmul) to bound memory."""
    w = unembedding(config, params).astype(hidden.dtype)
    logits = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
    if config.final_softcap is not None:
        logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits
