"""Per-token and per-sequence log-probs ln π(y|x) of responses, from the model's hidden states.

The log-softmax is always in float32 (the model's `logits_from_hidden` returns float32 logits
even for bfloat16 parameters). With `seq_chunk`, the `[batch, seq, vocab]` logits are never
materialised at once: positions go through the LM head `seq_chunk` at a time, and the chunk is
recomputed in the backward pass instead of stored.

`model` is anything with `hidden_states(params, ids, mask)` and `logits_from_hidden(params, h)`
(an `ld_jax.models.LanguageModel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ld_jax.models.constraints import constrain_batch


def token_logprobs(model, params, input_ids, attention_mask, seq_chunk: int | None = None):
    """input_ids, attention_mask `[batch, seq]` -> `[batch, seq]` float32 where entry t is
    ln π(ids[t] | ids[<t]) (the logits at t − 1 predict token t); entry 0 is 0."""
    hidden = model.hidden_states(params, input_ids, attention_mask)[:, :-1]  # [b, s-1, d]
    hidden = constrain_batch(hidden)  # split over the batch axes under jit (models/constraints)
    targets = input_ids[:, 1:]  # [b, s-1]
    if seq_chunk is None or seq_chunk >= targets.shape[1]:
        lp = _target_logprobs(model, params, hidden, targets)
    else:
        lp = _chunked_target_logprobs(model, params, hidden, targets, seq_chunk)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def sequence_logprobs(model, params, input_ids, attention_mask, response_mask, seq_chunk=None):
    """`[batch, seq]` inputs -> (ln π(y|x) summed over response tokens `[batch]` float32,
    response lengths `[batch]` float32)."""
    mask = response_mask.astype(jnp.float32)
    lp = token_logprobs(model, params, input_ids, attention_mask, seq_chunk)
    return jnp.sum(lp * mask, axis=-1), jnp.sum(mask, axis=-1)


def pair_logprobs(model, params, batch, seq_chunk: int | None = None):
    """Chosen and rejected in one forward pass: a `data.batch.PairBatch` with sequences
    `[B, 2, S]` -> (log-probs `[B, 2]`, response lengths `[B, 2]`), axis 1 = (chosen, rejected)."""
    b, two, s = batch.input_ids.shape
    flat = [
        x.reshape(b * two, s) for x in (batch.input_ids, batch.attention_mask, batch.response_mask)
    ]
    logps, lengths = sequence_logprobs(model, params, *flat, seq_chunk=seq_chunk)
    return logps.reshape(b, two), lengths.reshape(b, two)


def _target_logprobs(model, params, hidden, targets):
    """hidden `[b, n, d]`, targets `[b, n]` -> ln softmax(logits)[target] `[b, n]` float32."""
    logits = model.logits_from_hidden(params, constrain_batch(hidden)).astype(jnp.float32)
    logits = constrain_batch(logits)  # [b, n, V], b split over the batch axes under jit
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _chunked_target_logprobs(model, params, hidden, targets, chunk: int):
    b, n, d = hidden.shape
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n_chunks = (n + pad) // chunk
    # [n_chunks, b, chunk, ...]: lax.map runs the LM head one chunk at a time
    hs = hidden.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)
    step = jax.checkpoint(lambda xs: _target_logprobs(model, params, *xs))
    lp = jax.lax.map(step, (hs, ts))  # [n_chunks, b, chunk]
    return lp.swapaxes(0, 1).reshape(b, n + pad)[:, :n]
