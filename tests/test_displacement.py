"""The first-order displacement rates against per-sample PyTorch autograd on the transformers
model (pair mode) and against a finite difference of ln π(y+) after a small gradient step
(dataset mode)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from conftest import random_pairs, save_tiny_llama

from ld_jax import displacement, models
from ld_jax.data.formatting import TokenizedPair
from ld_jax.errors import LdJaxError
from ld_jax.train.optim import OptimizerConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("rates"), tokenizer=None)
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return models.from_pretrained(str(path)), torch_model


def torch_logp(model, prompt, response):
    """Σ over response tokens of ln π(token | prefix), PyTorch, differentiable."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1 :].sum()


def torch_rates(model, pairs):
    params = [p for p in model.parameters() if p.requires_grad]
    out = {k: [] for k in displacement.RATE_KEYS}
    for p in pairs:
        gp = torch.autograd.grad(torch_logp(model, p.prompt_ids, p.chosen_ids), params)
        gm = torch.autograd.grad(torch_logp(model, p.prompt_ids, p.rejected_ids), params)
        dot = lambda a, b: float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))  # noqa: E731
        out["pos_sq"].append(dot(gp, gp))
        out["cross"].append(dot(gp, gm))
        out["neg_sq"].append(dot(gm, gm))
        out["rate"].append(dot(gp, [a - b for a, b in zip(gp, gm)]))
    return {k: np.array(v) for k, v in out.items()}


def assert_close(got, want):
    # 1e-4 relative, 1e-3 absolute near zero (the tolerance)
    np.testing.assert_allclose(
        got, want, rtol=1e-4, atol=1e-3 * max(1.0, np.abs(want).max() * 1e-3)
    )


def test_pair_rates_match_per_sample_pytorch_autograd(tiny):
    lm, torch_model = tiny
    pairs = random_pairs(6, seed=4)
    # identical responses: g+ = g−, so the rate is exactly 0 and cross = pos_sq
    pairs[1] = TokenizedPair(1, pairs[1].prompt_ids, pairs[1].chosen_ids, pairs[1].chosen_ids)
    got = displacement.first_order_rates(
        lm,
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        batch_size=4,
    )
    want = torch_rates(torch_model, pairs)
    for key in displacement.RATE_KEYS:
        assert got[key].shape == (6,)
        assert_close(got[key], want[key])
    assert abs(got["rate"][1]) < 1e-3 * got["pos_sq"][1]


def test_vectorized_and_batched_equal_one_at_a_time(tiny):
    lm, _ = tiny
    pairs = random_pairs(5, seed=5)
    one = displacement.pair_rates(lm, pairs, batch_size=1)
    many = displacement.pair_rates(lm, pairs, batch_size=4, vectorize=2)
    for key in displacement.RATE_KEYS:
        np.testing.assert_allclose(many[key], one[key], rtol=2e-5, atol=1e-6)


MULTI_DEVICE = """
import json, sys, jax
from conftest import random_pairs
from ld_jax import displacement, models
assert jax.device_count() == 8
lm = models.from_pretrained(sys.argv[1])
out = {}
for layout in ("paired", "shared_prefix"):  # batch 3 is rounded up to 8, one pair a device
    got = displacement.pair_rates(lm, random_pairs(11, seed=9), batch_size=3, layout=layout)
    out[layout] = {k: v.tolist() for k, v in got.items()}
print("RESULT", json.dumps(out))
"""


def test_data_parallel_over_eight_devices_equals_one(tiny, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    lm, _ = tiny
    tests = Path(__file__).parent
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=f"{tests.parent}{os.pathsep}{tests}",
    )
    run = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE, lm.source],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tests.parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    eight = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))[7:])
    from ld_jax.train import sharding

    one_device = sharding.make_mesh(devices=jax.devices()[:1])
    for layout in ("paired", "shared_prefix"):
        one = displacement.pair_rates(
            lm, random_pairs(11, seed=9), batch_size=3, mesh=one_device, layout=layout
        )
        for key in displacement.RATE_KEYS:
            np.testing.assert_allclose(eight[layout][key], one[key], rtol=1e-5, atol=1e-6)


def test_dataset_rates_match_a_finite_difference_of_a_small_gradient_step(tiny):
    lm, _ = tiny
    pairs = random_pairs(6, seed=6)
    rates = displacement.dataset_rates(lm, pairs, batch_size=4)
    grad = displacement.dataset_gradient(lm, pairs, displacement.LossConfig("dpo"), batch_size=4)
    norm = np.sqrt(
        sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in jax.tree.leaves(grad))
    )
    eps = 1e-2 / norm  # a step of length 1e-2 in parameter space

    def lp_plus(params):
        return displacement.pair_logps(lm, pairs, params)[:, 0]

    plus = jax.tree.map(lambda p, g: p - eps * g, lm.params, grad)
    minus = jax.tree.map(lambda p, g: p + eps * g, lm.params, grad)
    fd = (lp_plus(plus) - lp_plus(minus)) / (2 * eps)
    np.testing.assert_allclose(rates, fd, rtol=2e-2, atol=2e-2 * np.abs(fd).max())


def test_bad_inputs_are_one_line_errors(tiny):
    lm, _ = tiny
    with pytest.raises(LdJaxError, match="2 prompts, 1 chosen"):
        displacement.first_order_rates(lm, [[3], [4]], [[5]], [[6], [7]])
    with pytest.raises(LdJaxError, match="pair 0 has an empty"):
        displacement.first_order_rates(lm, [[3]], [[]], [[6]])
    with pytest.raises(LdJaxError, match="multiple of vectorize"):
        displacement.pair_rates(lm, random_pairs(2), batch_size=3, vectorize=2)


def test_update_mode_linearisation_matches_the_measured_change_at_a_small_lr(tiny):
    lm, _ = tiny
    pairs = random_pairs(6, seed=7)
    small = OptimizerConfig(name="rmsprop", lr=1e-6)
    got = displacement.update_rates(lm, pairs, small, batch_size=4)
    assert got["linear"].shape == got["measured"].shape == (6,)
    assert np.abs(got["measured"]).max() > 0
    np.testing.assert_allclose(
        got["linear"], got["measured"], rtol=5e-2, atol=5e-2 * np.abs(got["measured"]).max()
    )


def test_rate_cli_streams_every_sample_and_filter_selects_by_rate(tmp_path, capsys):
    from conftest import tiny_tokenizer

    from ld_jax import cli, scoring
    from ld_jax.data import formatting, preference

    model = str(save_tiny_llama(tmp_path / "model", tokenizer=tiny_tokenizer(markers=False)))
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
        {"prompt": "2+2?", "chosen": "4", "rejected": "It is five."},
        {"prompt": "Empty?", "chosen": "", "rejected": "Not empty."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
        {"prompt": "Name?", "chosen": "Ada", "rejected": "I would rather not say."},
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rates.jsonl"
    argv = ["rate", "--model", model, "--data", str(data), "--out", str(out)]
    assert cli.main([*argv, "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "kept 4 of 5 pairs; skipped empty_chosen=1" in printed and "rate < 0" in printed
    lines = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(lines) == [0, 1, 2, 3, 4] and lines[2] == {"index": 2, "skipped": "empty_chosen"}

    lm = models.from_pretrained(model)
    pairs, _ = formatting.tokenize_preferences(
        preference.load_preferences(data), lm.tokenizer, drop_identical=False
    )
    want = torch_rates(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(model), pairs
    )
    for k, p in enumerate(pairs):
        for key in displacement.RATE_KEYS:
            assert lines[p.index][key] == pytest.approx(want[key][k], rel=1e-4, abs=1e-3)

    kept = tmp_path / "kept.jsonl"
    assert (
        cli.main(
            [
                "filter",
                "--data",
                str(data),
                "--scores",
                str(out),
                "--by",
                "rate",
                "--keep-lowest",
                "0.5",
                "--out",
                str(kept),
            ]
        )
        == 0
    )
    lowest = sorted((r["rate"], i) for i, r in lines.items() if "rate" in r)[:2]
    assert [json.loads(x)["index"] for x in kept.read_text().splitlines()] == sorted(
        i for _, i in lowest
    )
    with pytest.raises(LdJaxError, match="ln_ches"):
        scoring.filter_file(
            scoring.FilterConfig(str(data), str(out), str(tmp_path / "x.jsonl"), keep_lowest=0.5)
        )


def test_single_token_rate_on_the_head_equals_theorem4_closed_form(tiny):
    """Theorem 4 (flow.theorems.theorem4, float64) at the tiny model's h_x and W equals the rate
    with the gradient restricted to (W as LM head, the final hidden states), by autodiff
    through the model's own code; the full-network rate has more terms and differs."""
    lm, _ = tiny
    rng = np.random.default_rng(8)
    pairs = [
        TokenizedPair(i, [int(t) for t in rng.integers(3, 128, 1 + i % 5)], [a], [b])
        for i, (a, b) in enumerate(rng.integers(3, 128, (6, 2)).tolist())
    ]
    head = displacement.head_rates(lm, pairs, batch_size=4)
    closed = displacement.theorem4_inner(lm, pairs)
    np.testing.assert_allclose(head["rate"], closed["inner"], rtol=1e-4, atol=1e-6)
    assert np.all(closed["m"] > 0)  # Theorem 4's m is non-negative
    full = displacement.pair_rates(lm, pairs, batch_size=4)
    assert np.all(full["pos_sq"] > head["pos_sq"])  # the body's parameters add to ‖g+‖²
    with pytest.raises(LdJaxError, match="one token"):
        displacement.theorem4_inner(lm, random_pairs(2))


# ------------------------------------------------------------------ SmolLM2-135M-Instruct (slow)

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    from ld_jax.models import loading

    lm = models.from_pretrained("smollm2-135m-instruct")
    path = str(loading.resolve("smollm2-135m-instruct"))
    return lm, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_rates_match_per_sample_pytorch_autograd(smollm2):
    from ld_jax import scoring
    from ld_jax.data import preference

    lm, torch_model = smollm2
    cfg = scoring.ScoringConfig("", str(SHARED / "ultrafeedback" / "train.jsonl"), "", 96)
    records = preference.load_preferences(cfg.data, limit=4)
    pairs, _, _ = scoring.prepare_pairs(records, lm.tokenizer, cfg)
    want = torch_rates(torch_model, pairs)
    for layout in ("paired", "shared_prefix"):
        got = displacement.pair_rates(lm, pairs, batch_size=2, layout=layout)
        for key in displacement.RATE_KEYS:
            assert_close(got[key], want[key])


@pytest.mark.slow
def test_smollm2_persona_head_rate_equals_theorem4(smollm2):
    from ld_jax.experiments.persona import run

    lm, _ = smollm2
    records = run.load_records(SHARED / "persona" / "ends-justify-means.jsonl")[:4]
    prompts, _ = run.encode_prompts(lm.tokenizer, [r["question"] for r in records], "auto")
    ids = run.resolve_tokens(lm.tokenizer, ["Yes", "No"], {})
    pairs = [
        TokenizedPair(i, p, [ids["Yes"]["id"]], [ids["No"]["id"]]) for i, p in enumerate(prompts)
    ]
    head = displacement.head_rates(lm, pairs, batch_size=2)
    closed = displacement.theorem4_inner(lm, pairs)
    np.testing.assert_allclose(head["rate"], closed["inner"], rtol=1e-4)
