"""Sequence log-probs against transformers' PyTorch Llama (fp32), chunking, padding, bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import random_pairs

from ld_jax import logprobs
from ld_jax.data import pipeline


def _torch_pair_logps(path, batch):
    """Reference: transformers' model, log_softmax in fp32, summed over the response mask."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    b, two, s = batch.input_ids.shape
    ids = torch.tensor(batch.input_ids.reshape(-1, s), dtype=torch.long)
    mask = torch.tensor(batch.attention_mask.reshape(-1, s))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    resp = torch.tensor(batch.response_mask.reshape(-1, s))[:, 1:].float()
    return (lp * resp).sum(-1).reshape(b, two).numpy()


def test_pair_logprobs_match_transformers(tiny):
    path, lm = tiny
    batch = pipeline.make_batches(random_pairs(6), 6, shuffle=False, pad_to_multiple=8)[0]
    ours, lengths = jax.jit(lambda p, b: logprobs.pair_logprobs(lm, p, b))(lm.params, batch)
    np.testing.assert_allclose(
        np.asarray(ours), _torch_pair_logps(path, batch), atol=1e-4, rtol=1e-5
    )
    np.testing.assert_array_equal(lengths, batch.response_mask.sum(-1))


def test_chunked_left_padded_equals_plain(tiny):
    _, lm = tiny
    pairs = random_pairs(5, seed=1)
    right = pipeline.make_batches(pairs, 5, shuffle=False, seq_len=22)[0]
    left = pipeline.make_batches(pairs, 5, shuffle=False, seq_len=22, padding_side="left")[0]
    run = jax.jit(lambda b, c: logprobs.pair_logprobs(lm, lm.params, b, c)[0], static_argnums=1)
    plain = run(right, None)
    for chunk in (7, 5):  # one that divides seq - 1 = 21 and one that does not
        np.testing.assert_allclose(run(right, chunk), plain, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(run(left, None), plain, atol=1e-4)


def test_chunked_gradient_equals_plain(tiny):
    _, lm = tiny
    batch = pipeline.make_batches(random_pairs(3, seed=2), 3, shuffle=False, pad_to_multiple=8)[0]

    def grad(chunk):
        def loss(p):
            return logprobs.pair_logprobs(lm, p, batch, chunk)[0].sum()

        return jax.jit(jax.grad(loss))(lm.params)

    for a, b in zip(jax.tree.leaves(grad(None)), jax.tree.leaves(grad(5))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_token_logprobs_are_normalised_log_probabilities(tiny):
    """Summing exp over every possible next token gives 1: entries are log-softmax values."""
    _, lm = tiny
    ids = jnp.array([[5, 9, 17, 3]])
    mask = jnp.ones_like(ids)
    candidates = jnp.tile(ids, (128, 1)).at[:, -1].set(jnp.arange(128))
    lp = jax.jit(lambda p, i, m: logprobs.token_logprobs(lm, p, i, m))(
        lm.params, candidates, jnp.tile(mask, (128, 1))
    )
    assert lp.shape == (128, 4) and float(lp[0, 0]) == 0.0
    np.testing.assert_allclose(jnp.exp(lp[:, -1]).sum(), 1.0, rtol=1e-5)


def test_bf16_params_give_fp32_logprobs_close_to_fp32(tiny):
    _, lm = tiny
    batch = pipeline.make_batches(random_pairs(4, seed=3), 4, shuffle=False, pad_to_multiple=8)[0]
    lm16 = lm.with_options(dtype="bfloat16")
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), lm.params)
    lp16, _ = jax.jit(lambda p, b: logprobs.pair_logprobs(lm16, p, b))(params16, batch)
    lp32, _ = jax.jit(lambda p, b: logprobs.pair_logprobs(lm, p, b))(lm.params, batch)
    assert lp16.dtype == jnp.float32
    np.testing.assert_allclose(lp16, lp32, rtol=0.05, atol=0.3)
