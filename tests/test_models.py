"""Parity of ld_jax models with transformers' PyTorch models (the oracle), per family.

Each family gets a tiny random transformers model (2 layers, GQA where the family has it,
Gemma 2/3 with one sliding and one global layer and a window shorter than the sequence),
saved with `save_pretrained` and loaded with `models.from_pretrained`. The ld_jax batch mixes
an unpadded, a left-padded and a right-padded row; the oracle runs each row unpadded in torch.
"""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ld_jax import models
from ld_jax.models import core

SEQ = 12
VOCAB = 128
PAD = 3  # also a real token of the batch, as SmolLM2's <|im_end|> is of every chat prompt
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=PAD,  # transformers' embeddings freeze this row (nn.Embedding padding_idx)
)
# Per family: the config fields that exercise its peculiarities.
CASES = {
    "llama": dict(
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500.0,
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "gemma": dict(num_key_value_heads=1, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(
        query_pre_attn_scalar=12,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3_text": dict(
        query_pre_attn_scalar=12,
        final_logit_softcapping=5.0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=100.0),
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
        },
    ),
    "olmo": dict(clip_qkv=0.5, tie_word_embeddings=False),
    "olmo2": dict(tie_word_embeddings=False),
}
# Rows of the batch: (left pads, real tokens); SEQ = pads + tokens + right pads.
ROWS = [(0, SEQ), (4, SEQ - 4), (0, SEQ - 5)]


_BUILT = {}


def build(model_type, tmp_path_factory, cases=None):
    """(torch model, ld_jax LanguageModel) with the same random weights, built once per
    model type and `cases` table (default CASES; test_generate passes its own)."""
    cases = CASES if cases is None else cases
    key = (model_type, id(cases))
    if key not in _BUILT:
        config = AutoConfig.for_model(model_type, **{**TINY, **cases[model_type]})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        with torch.no_grad():  # make every weight (norm scales included) matter at O(1) scale
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(path)
        _BUILT[key] = model, models.from_pretrained(str(path))
    return _BUILT[key]


def target_logprob_sum(lm, params, ids, mask, targets):
    """Scalar loss: sum over real positions of log_softmax(logits)[target]; aux = Output."""
    out = lm.forward(params, ids, mask)
    logp = jnp.take_along_axis(jax.nn.log_softmax(out.logits), targets[..., None], -1)[..., 0]
    return jnp.sum(logp * mask), out


_RESULTS = {}


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, tmp_path_factory):
    """Torch model, ld_jax model, and ld_jax's (Output, gradients) on the padded batch: one
    compilation per family keeps the file fast."""
    if request.param not in _RESULTS:
        model, lm = build(request.param, tmp_path_factory)
        ids, mask, targets = (jnp.asarray(a) for a in batch())
        loss_and_grad = jax.jit(
            jax.value_and_grad(functools.partial(target_logprob_sum, lm), has_aux=True)
        )
        (_, out), grads = loss_and_grad(lm.params, ids, mask, targets)
        _RESULTS[request.param] = model, lm, out, grads
    return _RESULTS[request.param]


def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (len(ROWS), SEQ)).astype(np.int32)  # pads hold junk ids too
    ids[:, [5, 7]] = PAD  # position 5 is real in every row, 7 in the first two
    mask = np.zeros_like(ids)
    for row, (left, n) in enumerate(ROWS):
        mask[row, left : left + n] = 1
    targets = rng.integers(0, VOCAB, ids.shape).astype(np.int32)
    return ids, mask, targets


def real_positions(row):
    left, n = ROWS[row]
    return slice(left, left + n)


def torch_rows(model, ids):
    """Each row's real tokens run alone through torch: list of (logits [n, V], hidden [n, d])."""
    out = []
    for row in range(len(ROWS)):
        x = torch.tensor(ids[row, real_positions(row)], dtype=torch.long)[None]
        res = model(x, output_hidden_states=False)
        hidden = model.model(x).last_hidden_state
        out.append((res.logits[0], hidden[0]))
    return out


def test_logits_and_hidden_match_torch_with_left_and_right_padding(family):
    model, _, out, _ = family
    ids, _, _ = batch()
    with torch.no_grad():
        ref = torch_rows(model, ids)
    scale = max(float(r[0].abs().max()) for r in ref)
    assert scale > 1.0  # the random weights give logits large enough for 1e-4 to be strict
    for row, (ref_logits, ref_hidden) in enumerate(ref):
        real = real_positions(row)
        np.testing.assert_allclose(
            np.asarray(out.logits[row, real]), ref_logits.numpy(), atol=1e-4, rtol=0
        )
        np.testing.assert_allclose(
            np.asarray(out.hidden[row, real]), ref_hidden.numpy(), atol=1e-4, rtol=0
        )
    assert out.logits.dtype == jnp.float32


def test_gradients_match_torch(family):
    model, lm, _, grads = family
    ids, _, targets = batch()
    model.zero_grad()
    total = 0
    for row in range(len(ROWS)):
        real = real_positions(row)
        logits = model(torch.tensor(ids[row, real], dtype=torch.long)[None]).logits[0]
        target = torch.tensor(targets[row, real], dtype=torch.long)
        total = total + logits.log_softmax(-1).gather(-1, target[:, None]).sum()
    total.backward()

    layers = model.model.layers
    pairs = {
        "unembedding": (model.get_output_embeddings().weight.grad, lm.unembedding(grads)),
        "embedding": (model.get_input_embeddings().weight.grad, grads["embed"]),
        "layer0 q_proj": (layers[0].self_attn.q_proj.weight.grad.T, grads["layers"]["wq"][0]),
        "layer1 v_proj": (layers[1].self_attn.v_proj.weight.grad.T, grads["layers"]["wv"][1]),
    }
    for name, (ref, ours) in pairs.items():
        ref = ref.numpy()
        rel = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize("family", ["gemma3_text"], indirect=True)  # softcapping + sliding layers
def test_hidden_states_chunked_logits_remat_and_bf16_agree_with_forward(family):
    _, lm, out, grads = family
    ids, mask, targets = (jnp.asarray(a) for a in batch())
    hidden = jax.jit(lm.hidden_states)(lm.params, ids, mask)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(out.hidden), atol=1e-5, rtol=0)
    assert lm.unembedding(lm.params).shape == (lm.config.vocab_size, lm.config.d_model)
    # logits for half the positions at a time equal the full logits (softcap included)
    halves = [lm.logits_from_hidden(lm.params, hidden[:, s]) for s in (slice(0, 6), slice(6, SEQ))]
    np.testing.assert_allclose(np.concatenate(halves, 1), np.asarray(out.logits), atol=1e-5)

    remat = lm.with_options(remat=True)
    remat_grads = jax.jit(jax.grad(lambda p: target_logprob_sum(remat, p, ids, mask, targets)[0]))(
        lm.params
    )
    g, g_remat = grads["layers"]["wq"], remat_grads["layers"]["wq"]
    assert np.abs(g_remat - g).max() <= 1e-5 * np.abs(g).max()

    bf16 = lm.with_options(dtype="bfloat16")
    low = jax.jit(bf16.forward)(
        jax.tree.map(lambda p: p.astype(jnp.bfloat16), lm.params), ids, mask
    )
    assert low.logits.dtype == jnp.float32 and low.hidden.dtype == jnp.bfloat16
    rows = np.asarray(mask, bool)
    err = np.abs(np.asarray(low.logits) - np.asarray(out.logits))[rows].max()
    assert err < 0.05 * np.abs(np.asarray(out.logits)).max()


def test_fused_matmul_equals_separate_dots_above_and_below_the_row_threshold():
    rng = np.random.default_rng(3)
    ws = [jnp.asarray(rng.normal(size=(16, n)), jnp.float32) for n in (8, 4, 4)]
    for rows in (core.FUSE_MIN_ROWS, 2):  # concatenated weights; separate dots (decode)
        x = jnp.asarray(rng.normal(size=(rows, 3, 16)), jnp.float32)
        for ours, w in zip(core.fused_matmul(x, *ws), ws, strict=True):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(x @ w), rtol=1e-5, atol=1e-5)


def test_fused_projections_and_unrolled_layers_match_the_plain_path(family, monkeypatch):
    """The batch has fewer rows than FUSE_MIN_ROWS, so the fixture ran separate dots and a
    rolled scan; here every projection is fused and the layers unrolled."""
    _, lm, out, grads = family
    ids, mask, targets = (jnp.asarray(a) for a in batch())
    assert ids.size < core.FUSE_MIN_ROWS
    monkeypatch.setattr(core, "FUSE_MIN_ROWS", 1)
    fast = lm.with_options(unroll_layers=True)
    loss_and_grad = jax.jit(
        jax.value_and_grad(functools.partial(target_logprob_sum, fast), has_aux=True)
    )
    (_, fast_out), fast_grads = loss_and_grad(lm.params, ids, mask, targets)
    scale = np.abs(np.asarray(out.logits)).max()
    assert np.abs(np.asarray(fast_out.logits) - np.asarray(out.logits)).max() <= 1e-5 * scale
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ours = fast_grads
        for key in path:
            ours = ours[key.key]
        rel = np.abs(np.asarray(ours) - np.asarray(g)).max() / np.abs(np.asarray(g)).max()
        assert rel <= 1e-5, f"{jax.tree_util.keystr(path)}: relative gradient error {rel:.2e}"
