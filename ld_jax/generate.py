"""Batched autoregressive sampling with a KV cache, jitted end to end (every model family).

    lm = models.from_pretrained("smollm2-135m-instruct")
    samples = generate.generate_text(lm, ["How do I pick a lock?"], SamplingConfig(temperature=1.0))

One compiled program per (model config, batch, prompt length, max_new_tokens): a prefill pass
over the left-padded prompt batch fills the KV cache, then a `jax.lax.while_loop` of
single-token decode steps (`models.hidden_states_cached`) samples until every row has emitted a
stop token or `max_new_tokens` are out. Temperature and top-p are traced scalars, so changing
them does not recompile. Draw t of a call uses `fold_in(PRNGKey(seed), t)`: the same seed, batch
and settings give the same samples.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ld_jax import models
from ld_jax.errors import LdJaxError
from ld_jax.models import core
from ld_jax.models.config import ModelConfig, Params

# End-of-turn markers of chat templates; those the tokenizer knows are stop tokens too.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. temperature 0 is greedy; top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p (at least the most likely one). `stop_token_ids` None means
    `stop_token_ids(lm)`: the model's EOS ids plus the tokenizer's end-of-turn tokens."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    batch_size: int = 8  # rows per compiled call in generate_text
    pad_prompts_to: int = 32  # prompt length rounded up to a multiple of this (fewer recompiles)


class Generation(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens] int32; pad_id after a row's stop token
    lengths: jax.Array  # [batch] int32: generated tokens, the stop token included
    finished: jax.Array  # [batch] bool: the row emitted a stop token
    logprobs: jax.Array  # [batch, max_new_tokens] float32: log pi(token | prefix) of the model
    # itself (temperature 1, no top-p): E3's ln pi of sampled responses; 0 after the stop token


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    sample_index: int  # 0 .. num_samples-1 for the same prompt
    text: str  # decoded without special tokens
    token_ids: tuple[int, ...]  # generated ids, the stop token included
    logprob: float  # sum of the model's log pi over token_ids (temperature 1)
    finished: bool  # False: cut at max_new_tokens


# ---------------------------------------------------------------- the jitted sampler


def choose_tokens(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """logits [batch, vocab] float32 -> token ids [batch] int32: argmax when temperature is 0,
    else a draw from softmax(logits / temperature) restricted to the top-p nucleus."""

    def draw(logits):
        scaled = logits / temperature
        scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda x, _: x, scaled, top_p)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    greedy = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(temperature > 0, draw, greedy, logits)


def nucleus(logits: jax.Array, top_p) -> jax.Array:
    """logits [batch, vocab] -> same, with tokens outside the top-p nucleus set to -inf.
    A token is kept when the probability of the tokens ranked above it is below top_p, as
    transformers' TopPLogitsWarper (so the most likely token is always kept)."""
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "stop_ids", "pad_id"))
def sample(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    key: jax.Array,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
) -> Generation:
    """Sample continuations of a left-padded prompt batch.

    input_ids, attention_mask [batch, prompt_len] int32, every row's last column a real token
    (left padding); key a PRNG key; temperature, top_p scalars. Returns Generation with
    tokens [batch, max_new_tokens]. Step t draws with `fold_in(key, t)`.
    """
    b, prompt_len = input_ids.shape
    params = core.cast_params(params, config.dtype)  # once, not in every decode step
    cache = models.init_cache(config, b, prompt_len + max_new_tokens)
    hidden, cache = models.hidden_states_cached(config, params, input_ids, attention_mask, cache)
    logits = models.logits_from_hidden(config, params, hidden[:, -1])
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
    real = jnp.ones((b, 1), jnp.int32)

    def not_done(state):
        step, finished = state[0], state[4]
        return (step < max_new_tokens) & ~jnp.all(finished)

    def step_fn(state):
        step, cache, logits, tokens, finished, lengths, logprobs = state
        token = choose_tokens(logits, jax.random.fold_in(key, step), temperature, top_p)
        token = jnp.where(finished, pad_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)
        logp = jnp.where(finished[:, None], 0.0, logp)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logp, step, axis=1)
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | jnp.isin(token, stop)
        # Finished rows keep decoding pad tokens (masked as real); their output is already fixed.
        hidden, cache = models.hidden_states_cached(config, params, token[:, None], real, cache)
        logits = models.logits_from_hidden(config, params, hidden[:, 0])
        return step + 1, cache, logits, tokens, finished, lengths, logprobs

    state = (
        jnp.zeros((), jnp.int32),
        cache,
        logits,
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
    )
    _, _, _, tokens, finished, lengths, logprobs = jax.lax.while_loop(not_done, step_fn, state)
    return Generation(tokens, lengths, finished, logprobs)


def sample_batch(lm, input_ids, attention_mask, sampling: SamplingConfig, key=None) -> Generation:
    """`sample` for a LanguageModel and a SamplingConfig; checks the left padding.
    input_ids, attention_mask [batch, prompt_len] (numpy or jax)."""
    mask = np.asarray(attention_mask)
    if mask.ndim != 2 or not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
        raise LdJaxError("prompts must be left-padded with at least one real token per row")
    key = jax.random.PRNGKey(sampling.seed) if key is None else key
    stop = stop_token_ids(lm) if sampling.stop_token_ids is None else sampling.stop_token_ids
    return sample(
        lm.config,
        lm.params,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        key,
        jnp.float32(sampling.temperature),
        jnp.float32(sampling.top_p),
        max_new_tokens=sampling.max_new_tokens,
        stop_ids=tuple(sorted(set(stop))),
        pad_id=models.pad_id(lm),
    )


# ---------------------------------------------------------------- text in, text out


def stop_token_ids(lm) -> tuple[int, ...]:
    """The model's EOS ids, the tokenizer's EOS and the end-of-turn tokens it knows."""
    ids = set(lm.config.eos_token_ids)
    tok = lm.tokenizer
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        vocab = tok.get_vocab()
        ids.update(int(vocab[t]) for t in END_OF_TURN if t in vocab)
    return tuple(sorted(ids))


def format_prompts(tokenizer, prompts: Sequence, template: str = "auto") -> list[str]:
    """Prompts (strings, or lists of {"role", "content"} messages) -> texts to tokenize.
    "chat" (the "auto" choice when the tokenizer has a template) renders each with
    `apply_chat_template(add_generation_prompt=True)`; "plain" passes strings through."""
    from ld_jax.data.formatting import resolve_template

    if resolve_template(template, tokenizer) == "plain":
        if not all(isinstance(p, str) for p in prompts):
            raise LdJaxError("template 'plain' takes string prompts, not message lists")
        return list(prompts)
    messages = [
        [{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts
    ]
    return [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in messages
    ]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (input_ids, attention_mask) [len(rows), L] int32, left-padded, with L the
    longest row rounded up to `multiple`."""
    if not rows or any(len(r) == 0 for r in rows):
        raise LdJaxError("every prompt needs at least one token")
    length = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = r
        mask[i, length - len(r) :] = 1
    return ids, mask


def generate_text(
    lm,
    prompts: Sequence,
    sampling: SamplingConfig,
    template: str = "auto",
    num_samples: int = 1,
    progress: str | None = None,
) -> list[Sample]:
    """Sample `num_samples` responses per prompt; returns them prompt-major.

    Rows run in chunks of `sampling.batch_size`; the last chunk is filled with repeats so that
    every chunk has the same shape (one compilation). Chunk c uses `fold_in(PRNGKey(seed), c)`.
    `progress`: a description to show a progress bar over the chunks under (None: no bar)."""
    tok = lm.tokenizer
    if tok is None:
        raise LdJaxError("generate_text needs a model directory with a tokenizer")
    texts = format_prompts(tok, prompts, template)
    # Chat templates write their own special tokens (BOS included); plain prompts get the defaults.
    special = not (
        template == "chat" or (template == "auto" and getattr(tok, "chat_template", None))
    )
    encoded = [list(ids) for ids in tok(texts, add_special_tokens=special)["input_ids"]]
    rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    key, out = jax.random.PRNGKey(sampling.seed), []
    starts = range(0, len(rows), sampling.batch_size)
    for c, start in enumerate(tqdm(starts, desc=progress, unit="batch", disable=progress is None)):
        chunk = rows[start : start + sampling.batch_size]
        filled = chunk + [chunk[0]] * (sampling.batch_size - len(chunk))
        ids, mask = left_pad(
            [encoded[p] for p, _ in filled], models.pad_id(lm), sampling.pad_prompts_to
        )
        gen = jax.device_get(sample_batch(lm, ids, mask, sampling, jax.random.fold_in(key, c)))
        for i, (p, s) in enumerate(chunk):
            token_ids = tuple(int(t) for t in gen.tokens[i, : gen.lengths[i]])
            text = tok.decode(token_ids, skip_special_tokens=True)
            logprob = float(gen.logprobs[i, : gen.lengths[i]].sum())
            out.append(Sample(p, s, text, token_ids, logprob, bool(gen.finished[i])))
    return out
