"""The shared-prefix layout (one packed row [prompt, y+, y−] per pair, `data.batch`) against the
paired layout as it was computed before it (two padded rows, the LM head over every position,
`logprobs.dense_pair_logprobs`), on a tiny random model of every family (`test_models.build`:
GQA, Gemma 2/3 with a sliding window of 4 shorter than the rows, softcaps, OLMo's clip_qkv),
with left and right padding and prompts of length 1. The paired path itself is held to
transformers by test_logprobs / test_models / test_ches.
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import random_pairs  # noqa: E402
from test_models import CASES  # noqa: E402
from test_models import build as build_models  # noqa: E402

from ld_jax import ches, logprobs  # noqa: E402
from ld_jax.data import pipeline  # noqa: E402
from ld_jax.data.formatting import TokenizedPair  # noqa: E402
from ld_jax.losses import LossConfig  # noqa: E402
from ld_jax.train import loop  # noqa: E402
from ld_jax.train.optim import OptimizerConfig  # noqa: E402


def _pairs(seed=3):
    """Random pairs (parts of 1..11 tokens, responses longer than the window) plus two with
    a one-token prompt, one of them with one-token responses."""
    pairs = random_pairs(5, seed=seed, max_len=12)
    return pairs + [
        TokenizedPair(5, [7], [9, 10, 11, 12, 13, 14], [20, 21, 22]),
        TokenizedPair(6, [8], [30], [31]),
    ]


def _batches(side):
    pairs = _pairs()
    kw = dict(shuffle=False, pad_to_multiple=8, padding_side=side)
    paired = pipeline.make_batches(pairs, 8, layout="paired", **kw)[0]
    shared = pipeline.make_batches(pairs, 8, layout="shared_prefix", **kw)[0]
    return paired, shared


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def test_shared_prefix_rows_hold_prompt_then_both_responses_with_restarted_positions():
    p = TokenizedPair(0, [5, 6, 7], [8, 9], [10, 11, 12])
    for side in ("right", "left"):
        b = pipeline.collate([(p, None)], 1, pad_to_multiple=8, padding_side=side,
                             layout="shared_prefix")  # fmt: skip
        real = b.segments[0, 0] > 0
        assert b.input_ids[0, 0][real].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
        assert b.positions[0, 0][real].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
        assert b.segments[0, 0][real].tolist() == [1, 1, 1, 2, 2, 3, 3, 3]
        start = int(np.flatnonzero(real)[0])
        t = b.target_segments[0, 0] > 0
        assert b.target_ids[0, 0][t].tolist() == [8, 9, 10, 11, 12]
        # y−'s first token is predicted by the prompt's last state, not by y+'s last
        assert (b.predict_from[0, 0][t] - start).tolist() == [2, 3, 2, 5, 6]


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, tmp_path_factory):
    return build_models(request.param, tmp_path_factory)[1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_logprobs_gradients_and_ches_equal_the_paired_path(family, side):
    lm = family
    paired, shared = _batches(side)
    g_old, (lp_old, n_old) = _objective(lm, logprobs.dense_pair_logprobs)(lm.params, paired)
    g_new, (lp_new, n_new) = _objective(lm, logprobs.pair_logprobs)(lm.params, shared)
    np.testing.assert_array_equal(n_new, n_old)
    assert np.abs(np.asarray(lp_new) - np.asarray(lp_old)).max() <= 1e-5
    for path, old in jax.tree_util.tree_leaves_with_path(g_old):
        new = _leaf(g_new, path)
        assert _rel(new, old) <= 1e-5, (jax.tree_util.keystr(path), _rel(new, old))

    s_old = ches.ches_kernel(lm.hidden_states, lm.params, paired.sequences())
    s_new = ches.ches_kernel(lm.hidden_states, lm.params, shared.sequences())
    real = paired.valid > 0
    for key in ("ches", "ln_ches", "last_hidden_ip"):
        assert _rel(np.asarray(s_new[key])[real], np.asarray(s_old[key])[real]) <= 1e-4, key
    for key in ("len_chosen", "len_rejected"):
        np.testing.assert_array_equal(s_new[key], s_old[key])


_OBJECTIVES = {}


def _objective(lm, fn):
    """jit of ∇(Σ weights·log-probs) with the log-probs as aux, one per model and path: both
    padding sides have the same shapes, so the second side reuses the first's compilation."""
    if (id(lm), fn) not in _OBJECTIVES:
        weights = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)

        def f(params, batch):
            logps, lengths = fn(lm, params, batch)
            return (logps * weights).sum(), (logps, lengths)

        _OBJECTIVES[id(lm), fn] = jax.jit(jax.grad(f, has_aux=True))
    return _OBJECTIVES[id(lm), fn]


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


# each padding side once (both sides are held per family by the test above): two runs per case
@pytest.mark.parametrize(("family_name", "side"), [("llama", "left"), ("gemma2", "right")])
def test_a_training_run_has_the_same_metrics_in_both_layouts(
    family_name, side, tmp_path_factory, tmp_path
):
    lm = build_models(family_name, tmp_path_factory)[1]
    pairs = _pairs(seed=11)
    runs = {}
    for layout in ("paired", "shared_prefix"):
        cfg = loop.TrainConfig(
            output_dir=str(tmp_path / layout),
            batch_size=4,
            num_epochs=2,
            seed=3,
            progress=False,
            loss=LossConfig("dpo", beta=0.5),
            # SGD: an update linear in the gradient. RMSprop's first update is ~lr·sign(g), which
            # turns rounding noise in gradient entries near 0 into full-size steps (with it the
            # two runs' step-2 log-prob changes were 3e-4 relative apart)
            optimizer=OptimizerConfig(name="sgd", lr=0.05),
            data=dataclasses.replace(
                loop.DataConfig(), pad_to_multiple=8, padding_side=side, layout=layout
            ),
        )
        loop.train(cfg, model=lm, pairs=pairs)
        lines = (tmp_path / layout / "metrics.jsonl").read_text().splitlines()
        summary = json.loads((tmp_path / layout / "summary.json").read_text())
        runs[layout] = [json.loads(x) for x in lines], summary
    (old, old_summary), (new, new_summary) = runs["paired"], runs["shared_prefix"]
    assert len(old) == len(new) == 4
    for a, b in zip(old, new):
        for key, value in a.items():
            if key in ("step_s", "tokens_per_s"):
                continue
            if key in ("reward_accuracy", "fraction_chosen_fell") and a["step"] == 1:
                # policy = reference: every margin and log-prob change is 0 up to rounding, and
                # these count margins > 0 and changes < 0, i.e. the sign of float noise (the
                # margins and changes themselves agree)
                for k in ("margin", "chosen_logp_change"):
                    assert abs(a[k]) < 1e-5 and abs(b[k]) < 1e-5, k
                continue
            # abs 5e-5: the logp metrics are means of differences of two fp32 log-probs of
            # magnitude ~50, each within 1e-5 of the other layout's (the test above)
            assert b[key] == pytest.approx(value, rel=1e-4, abs=5e-5), (a["step"], key)
    for key, value in old_summary.items():
        if isinstance(value, float) and key != "tokens_per_s":
            assert new_summary[key] == pytest.approx(value, rel=1e-4, abs=5e-5), key
        elif key != "tokens_per_s":
            assert new_summary[key] == value, key


def test_the_packed_row_computes_fewer_positions():
    paired, shared = _batches("right")
    assert shared.input_ids.size < paired.input_ids.size
    assert (shared.pair_tokens() == paired.pair_tokens()).all()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_smollm2_shared_prefix_equals_paired(side):
    """SmolLM2-135M-Instruct (`ld-jax models pull smollm2-135m-instruct`): log-probs, gradients
    and CHES of the packed rows against the dense paired path, on random-token pairs."""
    from ld_jax import models

    lm = models.from_pretrained("smollm2-135m-instruct")
    pairs = random_pairs(3, vocab=lm.config.vocab_size, seed=5, max_len=40) + [
        TokenizedPair(3, [1], [5, 6, 7, 8], [9])
    ]
    kw = dict(shuffle=False, pad_to_multiple=16, padding_side=side)
    paired = pipeline.make_batches(pairs, 4, layout="paired", **kw)[0]
    shared = pipeline.make_batches(pairs, 4, layout="shared_prefix", **kw)[0]

    def objective(fn):
        def f(params, batch):
            logps, _ = fn(lm, params, batch)
            return logps.sum(), logps

        return jax.jit(jax.grad(f, has_aux=True))

    g_old, lp_old = objective(logprobs.dense_pair_logprobs)(lm.params, paired)
    g_new, lp_new = objective(logprobs.pair_logprobs)(lm.params, shared)
    print("max |logp diff|", np.abs(np.asarray(lp_new) - np.asarray(lp_old)).max())
    assert np.abs(np.asarray(lp_new) - np.asarray(lp_old)).max() <= 1e-4
    worst = max(
        _rel(_leaf(g_new, path), old) for path, old in jax.tree_util.tree_leaves_with_path(g_old)
    )
    print("max relative gradient diff", worst)
    assert worst <= 1e-5
    s_old = ches.ches_kernel(lm.hidden_states, lm.params, paired.sequences())
    s_new = ches.ches_kernel(lm.hidden_states, lm.params, shared.sequences())
    for key in ("ches", "ln_ches", "last_hidden_ip"):
        assert _rel(s_new[key], s_old[key]) <= 1e-4, key
