"""Pure-functional JAX language models loaded from Hugging Face safetensors checkpoints.

    lm = models.from_pretrained("smollm2-135m-instruct")        # or a checkpoint directory
    out = jax.jit(lm.forward)(lm.params, input_ids, attention_mask)
    out.logits  # [batch, seq, vocab] float32;  out.hidden  # [batch, seq, d_model]

All functions on `LanguageModel` are `functools.partial`s over the (static, hashable)
config, so they are pure in `params` and can be jitted, differentiated and sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from ld_jax.errors import LdJaxError
from ld_jax.models import core, loading, registry
from ld_jax.models.config import ModelConfig, Params, RopeConfig
from ld_jax.models.core import KVCache, Output
from ld_jax.models.loading import from_hf_config

__all__ = [
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "Output",
    "RopeConfig",
    "forward",
    "from_hf_config",
    "from_pretrained",
    "hidden_states",
    "hidden_states_cached",
    "init_cache",
    "logits_from_hidden",
    "pad_id",
    "save_pretrained",
    "unembedding",
]


def hidden_states(
    config: ModelConfig, params: Params, input_ids, attention_mask=None, *, layout=None
) -> jax.Array:
    """input_ids [batch, seq] int32 and either attention_mask [batch, seq] 0/1 (one padded
    sequence per row) or layout, a `core.TokenLayout` (explicit position ids and the segments
    of a packed row) -> [batch, seq, d_model] in the compute dtype: the final hidden states
    after the final norm (the LM-head input, SPEC's h)."""
    params = core.cast_params(params, config.dtype)
    if layout is None:
        layout = core.padding_layout(attention_mask)
    return registry.family(config.family).hidden_states(config, params, input_ids, layout)[0]


def hidden_states_cached(
    config: ModelConfig, params: Params, input_ids, attention_mask, cache: KVCache
):
    """Generation step: the new tokens input_ids, attention_mask [batch, seq] are written at
    slots `cache.index ...` of `cache` and attend to all earlier real slots. Returns (final
    hidden states [batch, seq, d_model], updated KVCache). Prefill is a call with
    `init_cache(config, batch, max_len)`; each decode step passes one token per row."""
    params = core.cast_params(params, config.dtype)
    layout = core.TokenLayout(None, attention_mask.astype(jax.numpy.int32))  # cache positions
    return registry.family(config.family).hidden_states(config, params, input_ids, layout, cache)


init_cache = core.init_cache


def forward(config: ModelConfig, params: Params, input_ids, attention_mask=None, *, layout=None):
    """input_ids, attention_mask [batch, seq] (or layout, as `hidden_states`) -> Output(logits
    [batch, seq, vocab] float32, hidden [batch, seq, d_model])."""
    hidden = hidden_states(config, params, input_ids, attention_mask, layout=layout)
    return Output(logits=logits_from_hidden(config, params, hidden), hidden=hidden)


unembedding = core.unembedding
logits_from_hidden = core.logits_from_hidden


@dataclass(frozen=True)
class LanguageModel:
    """A loaded checkpoint: config, parameters, tokenizer and the pure functions bound to the
    config. Use `with_options(remat=True, dtype="bfloat16")` for another run configuration."""

    config: ModelConfig
    params: Params
    tokenizer: Any
    forward: Callable[..., Output]
    hidden_states: Callable[..., jax.Array]
    unembedding: Callable[[Params], jax.Array]
    logits_from_hidden: Callable[..., jax.Array]
    # the checkpoint directory it was read from: `save_pretrained` takes its config.json
    source: str | None = None

    @classmethod
    def build(
        cls, config: ModelConfig, params: Params, tokenizer=None, source: str | None = None
    ) -> LanguageModel:
        bind = functools.partial
        return cls(
            config=config,
            params=params,
            tokenizer=tokenizer,
            forward=bind(forward, config),
            hidden_states=bind(hidden_states, config),
            unembedding=bind(unembedding, config),
            logits_from_hidden=bind(logits_from_hidden, config),
            source=source,
        )

    def with_options(self, **changes) -> LanguageModel:
        """Same parameters, config fields replaced (e.g. remat=True)."""
        return LanguageModel.build(
            dataclasses.replace(self.config, **changes), self.params, self.tokenizer, self.source
        )


def pad_id(lm: LanguageModel) -> int:
    """The id that pads token arrays: the tokenizer's pad, else the config's, else an EOS, else
    0, taking only ids inside the vocabulary. Padding is never attended to, so any real row of
    the embedding serves; an id past it would make `jnp.take` return NaN rows, which masked
    attention still multiplies into every output (0 · NaN = NaN)."""
    config = lm.config
    candidates = (
        getattr(lm.tokenizer, "pad_token_id", None),
        config.pad_token_id,
        *config.eos_token_ids,
        0,
    )
    return next(int(c) for c in candidates if c is not None and 0 <= c < config.vocab_size)


def from_pretrained(path_or_name: str, dtype: str = "float32", **options) -> LanguageModel:
    """Load a HF-format checkpoint directory (or a known model name, pulled on first use).

    `dtype` ("float32" or "bfloat16") is both the parameter and the compute dtype; `options`
    set run fields of ModelConfig such as `remat=True`."""
    if dtype not in loading.DTYPES:
        raise LdJaxError(f"dtype {dtype!r} not supported; use one of {', '.join(loading.DTYPES)}")
    path = loading.resolve(path_or_name)
    config = dataclasses.replace(loading.read_config(path), dtype=dtype, **options)
    params = loading.load_params(path, config, dtype)
    return LanguageModel.build(config, params, loading.load_tokenizer(path, config), str(path))


def save_pretrained(lm: LanguageModel, params: Params, out_dir, dtype: str = "float32", **kw):
    """Write `params` (ours, e.g. trained) as a Hugging Face checkpoint directory that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` reads; see `models.export`."""
    from ld_jax.models import export

    return export.save_pretrained(lm, params, out_dir, dtype, **kw)
