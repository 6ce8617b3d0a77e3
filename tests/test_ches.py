"""CHES kernel: SPEC §4 positions and formulas against per-sample references we did not derive
from the kernel (float64 NumPy slicing; the transformers PyTorch model's final hidden layer),
padding and batching invariance, bf16 reduction, edit distance against a textbook DP, and a
data-parallel run over two CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import save_tiny_llama  # noqa: E402

from ld_jax import ches, models  # noqa: E402
from ld_jax.data import formatting, pipeline, preference  # noqa: E402
from ld_jax.data.formatting import TokenizedPair  # noqa: E402
from ld_jax.errors import LdJaxError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128


def reference_scores(h_chosen, h_rejected, prompt_len, len_chosen, len_rejected):
    """SPEC §4 for one pair, straight from its definitions, in float64.

    h_* [P + R±, d]: the final hidden states of one unpadded prompt+response sequence."""
    hp = np.asarray(h_chosen, np.float64)[prompt_len - 1 : prompt_len + len_chosen - 1]
    hm = np.asarray(h_rejected, np.float64)[prompt_len - 1 : prompt_len + len_rejected - 1]
    assert len(hp) == len_chosen and len(hm) == len_rejected
    sp, sm = hp.sum(0), hm.sum(0)
    return dict(
        ches=sp @ sm - sp @ sp,
        ln_ches=sp @ sm / (len_chosen * len_rejected) - sp @ sp / len_chosen**2,
        last_hidden_ip=np.asarray(h_chosen, np.float64)[-1]
        @ np.asarray(h_rejected, np.float64)[-1],
    )


def assert_scores_close(got, want, rel=1e-4, near_zero_abs=1e-3):
    """The issue's tolerance: <= rel relative, or <= near_zero_abs absolute near zero."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    ok = np.abs(got - want) <= np.maximum(rel * np.abs(want), near_zero_abs)
    assert ok.all(), f"max rel err {np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))}"


def random_pairs(rng, n, max_prompt=9, max_reply=12):
    return [
        TokenizedPair(
            i,
            rng.integers(0, VOCAB, rng.integers(1, max_prompt)).tolist(),
            rng.integers(0, VOCAB, rng.integers(1, max_reply)).tolist(),
            rng.integers(0, VOCAB, rng.integers(1, max_reply)).tolist(),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- kernel over given states


@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_scores_use_spec_positions_on_either_padding_side(side):
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, 5)
    batch = pipeline.collate([(p, None) for p in pairs], 6, pad_to_multiple=16, padding_side=side)
    d = 7
    # Distinct random states everywhere, padding included: any off-by-one position or padding
    # leak changes the sums.
    hidden = rng.normal(size=(*batch.input_ids.shape, d))
    got = jax.jit(ches.pair_scores)(jnp.asarray(hidden, jnp.float32), batch)
    for b, p in enumerate(pairs):
        rows = []
        for j in range(2):
            real = np.flatnonzero(batch.attention_mask[b, j])
            rows.append(hidden[b, j, real])
        want = reference_scores(*rows, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))
        for key, value in want.items():
            assert_scores_close(got[key][b], value, rel=1e-5, near_zero_abs=1e-5)
        assert got["len_chosen"][b] == len(p.chosen_ids)
        assert got["len_rejected"][b] == len(p.rejected_ids)


def test_bf16_states_are_reduced_in_float32():
    rng = np.random.default_rng(1)
    s, d = 1024, 16
    pair = TokenizedPair(0, [1], [2] * (s - 1), [3] * (s - 1))
    batch = pipeline.collate([(pair, None)], 1, pad_to_multiple=s)
    hidden = jnp.asarray(1.0 + 0.01 * rng.normal(size=(1, 2, s, d)), jnp.bfloat16)
    got = jax.jit(ches.pair_scores)(hidden, batch)
    h = np.asarray(hidden.astype(jnp.float32))[0]
    want = reference_scores(h[0], h[1], 1, s - 1, s - 1)
    assert got["ches"].dtype == jnp.float32
    # A bf16 running sum of ~1000 values near 1 is off by several units; fp32 is not.
    assert_scores_close(got["ches"][0], want["ches"], rel=1e-4)
    assert_scores_close(got["ln_ches"][0], want["ln_ches"], rel=1e-4)


# ---------------------------------------------------------------- edit distance


def textbook_levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_edit_distance_matches_textbook_dp():
    rng = np.random.default_rng(2)
    a = [rng.integers(0, 5, rng.integers(1, 30)).tolist() for _ in range(200)]
    b = [rng.integers(0, 5, rng.integers(1, 30)).tolist() for _ in range(200)]
    want = [textbook_levenshtein(x, y) / max(len(x), len(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(ches.edit_distance(a, b), want, rtol=0, atol=1e-12)
    kitten, sitting = [ord(c) for c in "kitten"], [ord(c) for c in "sitting"]
    np.testing.assert_allclose(
        ches.edit_distance([kitten, [1, 2]], [sitting, [1, 2]]), [3 / 7, 0.0]
    )


# ---------------------------------------------------------------- a tiny random Llama vs PyTorch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=VOCAB, tokenizer=None)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    return models.from_pretrained(str(path)), model, path


def torch_final_hidden(model, ids):
    """[len] ids -> [len, d] final hidden states (after the final norm) from transformers."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    # The last entry of hidden_states must be the LM head's input, SPEC's h.
    torch.testing.assert_close(model.lm_head(hidden), out.logits[0], rtol=1e-5, atol=1e-5)
    return hidden.double().numpy()


def torch_reference(model, pairs):
    rows = [
        reference_scores(
            torch_final_hidden(model, p.prompt_ids + p.chosen_ids),
            torch_final_hidden(model, p.prompt_ids + p.rejected_ids),
            len(p.prompt_ids),
            len(p.chosen_ids),
            len(p.rejected_ids),
        )
        for p in pairs
    ]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def score(lm, pairs, **kw):
    return ches.ches_scores(
        lm,
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        **kw,
    )


def test_tiny_llama_matches_per_sample_pytorch(tiny):
    lm, model, _ = tiny
    pairs = random_pairs(np.random.default_rng(3), 7)
    pairs[2] = TokenizedPair(2, pairs[2].prompt_ids, pairs[2].chosen_ids, list(pairs[2].chosen_ids))
    got = score(lm, pairs, batch_size=4)
    want = torch_reference(model, pairs)
    assert set(got) == {"ches", "ln_ches", "last_hidden_ip", "edit_distance"}
    for key in want:
        assert got[key].shape == (7,)
        assert_scores_close(got[key], want[key])
    want_ed = [
        textbook_levenshtein(p.chosen_ids, p.rejected_ids)
        / max(len(p.chosen_ids), len(p.rejected_ids))
        for p in pairs
    ]
    np.testing.assert_allclose(got["edit_distance"], want_ed, atol=1e-12)


def test_batched_and_padded_equal_unbatched(tiny):
    lm = tiny[0]
    pairs = random_pairs(np.random.default_rng(4), 9, max_prompt=20, max_reply=30)
    one = score(lm, pairs, batch_size=1)
    many = score(lm, pairs, batch_size=4)
    for key in one:
        assert_scores_close(many[key], one[key], rel=1e-5, near_zero_abs=1e-5)


def test_left_and_right_padded_kernel_agree(tiny):
    lm = tiny[0]
    pairs = random_pairs(np.random.default_rng(5), 4, max_prompt=20, max_reply=30)
    out = {}
    for side in ("left", "right"):
        batch = pipeline.collate(
            [(p, None) for p in pairs], 4, pad_to_multiple=64, padding_side=side
        )
        out[side] = ches.ches_kernel(lm.hidden_states, lm.params, batch.sequences())
    for key in out["left"]:
        assert out["left"][key].shape == (4,)
        assert_scores_close(out["left"][key], out["right"][key], rel=1e-5, near_zero_abs=1e-5)


def test_an_out_of_range_pad_id_does_not_make_scores_nan(tiny):
    """A pad id past the vocabulary made `jnp.take` return NaN embeddings, which masked
    attention still multiplies into every real position (0 · NaN = NaN)."""
    import dataclasses

    lm, model, _ = tiny
    pairs = random_pairs(
        np.random.default_rng(6), 4, max_prompt=20, max_reply=30
    )  # unequal: padded
    bad = dataclasses.replace(lm, config=lm.config.replace(pad_token_id=VOCAB + 7))
    got = score(bad, pairs, batch_size=4)
    want = torch_reference(model, pairs)
    for key in want:
        assert np.isfinite(got[key]).all(), key
        assert_scores_close(got[key], want[key])
    assert 0 <= models.pad_id(bad) < VOCAB


def test_identical_responses_give_defined_zero_scores(tiny):
    lm = tiny[0]
    p = TokenizedPair(0, [5, 6, 7], [8, 9, 10, 2], [8, 9, 10, 2])
    got = score(lm, [p, p])
    for key in ("ches", "ln_ches", "last_hidden_ip", "edit_distance"):
        assert np.isfinite(got[key]).all()
    assert got["edit_distance"][0] == 0.0
    # ⟨H+, H− − H+⟩ with H− = H+ (up to padding round-off) is zero, not noise around ‖H+‖².
    assert_scores_close(got["ches"], [0.0, 0.0], near_zero_abs=1e-4)
    assert_scores_close(got["ln_ches"], [0.0, 0.0], near_zero_abs=1e-5)


def test_bad_arguments_are_one_line_errors(tiny):
    lm = tiny[0]
    with pytest.raises(LdJaxError, match="2 prompts, 1 chosen"):
        ches.ches_scores(lm, [[1], [2]], [[3]], [[4], [5]])
    with pytest.raises(LdJaxError, match="pair 1 has an empty"):
        ches.ches_scores(lm, [[1], [2]], [[3], []], [[4], [5]])
    assert all(v.shape == (0,) for v in ches.ches_scores(lm, [], [], []).values())


MULTI_DEVICE = """
import json, sys, numpy as np, jax
from ld_jax import ches, models
assert jax.device_count() == 2
lm = models.from_pretrained(sys.argv[1])
pairs = json.loads(sys.argv[2])
out = ches.ches_scores(lm, *zip(*pairs), batch_size=3)  # rounded up to 4, split over 2 devices
print("RESULT", json.dumps({k: v.tolist() for k, v in out.items()}))
"""


def test_data_parallel_over_two_devices_matches_one(tiny):
    lm, _, path = tiny
    pairs = random_pairs(np.random.default_rng(6), 7)
    triples = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MULTI_DEVICE), str(path), json.dumps(triples)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
    two = json.loads(line.split(" ", 1)[1])
    one = score(lm, pairs, batch_size=3)
    for key in one:
        assert_scores_close(two[key], one[key], rel=1e-5, near_zero_abs=1e-5)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct (slow)


@pytest.mark.slow
def test_smollm2_matches_per_sample_pytorch():
    from transformers import LlamaForCausalLM

    lm = models.from_pretrained("smollm2-135m-instruct")
    from ld_jax.models import loading

    model = LlamaForCausalLM.from_pretrained(str(loading.resolve("smollm2-135m-instruct"))).eval()
    records = preference.load_preferences(
        Path(__file__).resolve().parents[2] / "shared/data/ultrafeedback/train.jsonl", limit=40
    )
    pairs, _ = formatting.tokenize_preferences(
        records, lm.tokenizer, max_length=160, drop_identical=False
    )
    pairs = pairs[:6]
    got = score(lm, pairs, batch_size=3)
    want = torch_reference(model, pairs)
    for key in want:
        assert_scores_close(got[key], want[key])
