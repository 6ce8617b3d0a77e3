"""The unconstrained features flow (SPEC §5): closed forms against autodiff along integrated
flows (through `ld-jax flow verify`), autodiff against central finite differences, the loss
against the DPO formula written here, the paper's qualitative claims and the GD → flow limit.

Everything runs in float64 inside `jax.enable_x64`, so other test modules keep fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json

import jax
import numpy as np
import pytest
from scipy.special import expit, log_softmax

from ld_jax.cli import main
from ld_jax.flow import claims, dynamics, simulate, state, theorems
from ld_jax.losses import LossConfig

INSTANCES = 48  # per theorem here; `ld-jax flow verify` defaults to 1000 (docs/theory.md)


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def cli_verify(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        argv = [
            "flow",
            "verify",
            "--instances",
            str(INSTANCES),
            "--seed",
            "3",
            "--no-claims",
            "--out",
            str(out),
        ]
        assert main(argv) == 0
    lines = stdout.getvalue().strip().splitlines()
    return json.loads(lines[-1]), json.loads((out / "verify.json").read_text()), stdout.getvalue()


def test_cli_verify_every_theorem_matches_autodiff(cli_verify):
    summary, report, stdout = cli_verify
    print(stdout)
    expected = {f"theorem{i}" for i in range(4, 10)} | {"proposition1", "proposition2"}
    assert set(summary) == expected | {"instances", "max_abs_dlogpi_change"}
    assert summary["instances"] == INSTANCES
    for name in expected:
        assert summary[name] <= 1e-8, (name, summary[name])
        assert report["theorems"][name]["points_per_instance"] >= 6  # t = 0 and ≥ 5 later points
    # The flows must move: ln π(y+) changes by nats in a typical instance of every setting.
    assert summary["max_abs_dlogpi_change"] > 1.0
    assert all(r["median_abs_dlogpi_change"] > 0.3 for r in report["theorems"].values())


def test_cli_verify_exits_non_zero_naming_the_theorem_that_misses_tol(
    monkeypatch, tmp_path, capsys
):
    from ld_jax.flow import verify

    errors = dict.fromkeys(verify.THEOREMS, 1e-13) | {"theorem6": 3e-5}
    report = {"summary": {**errors, "instances": 2, "max_abs_dlogpi_change": 1.0}, "theorems": {}}
    monkeypatch.setattr(verify, "verify_all", lambda *a, **k: report)
    argv = ["flow", "verify", "--instances", "2", "--no-claims", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "theorem6 (3e-05)" in err and "theorem4" not in err and (tmp_path / "verify.json").is_file()
    )
    assert main(argv + ["--tol", "1e-4"]) == 0
    assert verify.misses(report["summary"], 1e-8) == ["theorem6 (3e-05)"]


def test_cli_rejects_bad_arguments(capsys):
    assert main(["flow", "verify", "--instances", "0"]) == 2
    assert "error" in capsys.readouterr().err


def test_prefix_states_share_only_the_prompt_state():
    plus, minus, track, n = state.prefix_states(3, 4, 2)
    np.testing.assert_array_equal(plus, [0, 1, 2])
    np.testing.assert_array_equal(minus, [0, 3, 4, 5])
    np.testing.assert_array_equal(track, [0, 6])
    assert n == 7


def test_loss_is_dpo_of_sequence_logprobs_written_in_numpy():
    params, problem = state.single_sample(np.random.default_rng(0), 1, 7, 5, 3, 2)
    params, problem = state.take(params, 0), state.take(problem, 0)
    W, h = np.asarray(params["W"]), np.asarray(params["h"])

    def seq_logprob(tokens, states):
        return sum(log_softmax(W @ h[s])[t] for t, s in zip(tokens, states))

    lp_plus = seq_logprob(np.asarray(problem.plus_tokens[0]), np.asarray(problem.plus_states[0]))
    lp_minus = seq_logprob(np.asarray(problem.minus_tokens[0]), np.asarray(problem.minus_states[0]))
    ref_plus, ref_minus = lp_plus + 0.3, lp_minus - 0.2  # a reference other than θ(0)
    problem = dataclasses.replace(
        problem, ref_plus=np.array([ref_plus]), ref_minus=np.array([ref_minus])
    )
    beta = 0.1
    margin = (lp_plus - ref_plus) - (lp_minus - ref_minus)
    expected = -np.log(expit(beta * margin))
    np.testing.assert_allclose(
        _loss(params, problem, LossConfig("dpo", beta=beta)), expected, rtol=1e-13
    )
    # ℓ′ in the closed forms is the DPO slope −β σ(−β(u − Δ_ref)).
    ell_prime = jax.jit(theorems.theorem6, static_argnums=2)(
        params, problem, LossConfig("dpo", beta=beta)
    )["ell_prime"]
    np.testing.assert_allclose(ell_prime, -beta * expit(-beta * margin), rtol=1e-13)


@pytest.mark.parametrize("loss_id", [0, 1, 2])
def test_autodiff_rate_matches_finite_differences(loss_id):
    """The ground truth of every check, rate = ⟨∇ ln π(y+), −∇L⟩, against central differences:
    −∇L along a random direction, and ln π(y+) along the velocity, for DPO, IPO, DPO + SFT."""
    losses = (
        LossConfig("dpo"),
        LossConfig("ipo"),
        LossConfig("dpo", sft_lambda=0.5),
    )  # one compile
    params, problem = state.single_sample(np.random.default_rng(1), 1, 9, 6, 3, 2)
    params, problem = state.take(params, 0), state.take(problem, 0)
    problem = dataclasses.replace(problem, loss_id=np.asarray(loss_id))
    lp = lambda p: state.logprobs(p, problem)[0][0]  # noqa: E731
    velocity, rate = _velocity_and_rate(params, problem, losses)
    shift = lambda p, d, e: jax.tree.map(lambda a, b: a + e * b, p, d)  # noqa: E731
    direction = jax.tree.map(lambda a: np.random.default_rng(2).standard_normal(a.shape), params)
    eps = 1e-5
    loss = lambda p: float(_loss(p, problem, losses))  # noqa: E731
    slope = (loss(shift(params, direction, eps)) - loss(shift(params, direction, -eps))) / (2 * eps)
    along = sum(
        float((v * d).sum()) for v, d in zip(jax.tree.leaves(velocity), jax.tree.leaves(direction))
    )
    np.testing.assert_allclose(-along, slope, rtol=1e-7)
    finite = (
        float(lp(shift(params, velocity, eps))) - float(lp(shift(params, velocity, -eps)))
    ) / (2 * eps)
    np.testing.assert_allclose(rate, finite, rtol=1e-7)


@functools.partial(jax.jit, static_argnums=2)
def _velocity_and_rate(params, problem, losses):
    lp = lambda p: state.logprobs(p, problem)[0][0]  # noqa: E731
    return dynamics.velocity(params, problem, losses), dynamics.rate(lp, params, problem, losses)


_loss = jax.jit(dynamics.loss, static_argnums=2)


def test_claim_a_rate_falls_and_flips_as_unembeddings_align():
    stats = claims.alignment_flip(np.random.default_rng(0), instances=100)
    print("claim (a):", stats)
    assert stats["max_probability_drift"] < 1e-12  # the rest of Theorem 4 is held fixed
    assert stats["fraction_strictly_decreasing"] == 1.0
    assert stats["max_rel_error_slope_vs_theorem4"] < 1e-8
    assert stats["fraction_sign_flips"] >= 0.6  # 0.79-0.82 measured over seeds 0-2


def test_claim_b_gainers_ranked_by_unembedding_alignment():
    stats = claims.mass_ranking(np.random.default_rng(0), instances=200)
    print("claim (b):", stats)
    assert stats["min_spearman"] > 1 - 1e-12


def test_claim_c_higher_ches_means_faster_fall():
    stats = claims.ches_correlation(np.random.default_rng(0), instances=400)
    print("claim (c):", stats)
    assert stats["spearman_ches_vs_rate"] < -0.5  # about −0.8 measured


def test_claim_d_contradicting_sample_pushes_y_plus_down():
    stats = claims.contradicting_sample(np.random.default_rng(0), instances=400)
    print("claim (d):", stats)
    assert stats["fraction_hidden_ip_positive"] > 0.5
    assert stats["fraction_more_negative_when_hidden_ip_positive"] == 1.0


def test_gradient_descent_converges_to_the_flow_linearly_in_the_step():
    rows = claims.gd_convergence(np.random.default_rng(0), instances=2, steps=(25, 50, 100, 200))
    print("GD → flow:", rows)
    errors = np.array([r["max_abs_error"] for r in rows])
    np.testing.assert_allclose(errors[:-1] / errors[1:], 2.0, rtol=0.1)  # error ∝ step
    assert errors[-1] < 1e-2


def test_simulate_no_vs_never_yes_overtakes_no(tmp_path):
    cfg = simulate.SimulateConfig(t1=60.0, n_save=61, out_dir=str(tmp_path))
    result = simulate.simulate(cfg)
    lp_plus = np.asarray(result["logpi_plus"])
    prompt = np.exp(np.asarray(result["prompt_logprobs"]))
    yes, no = simulate.NO_VS_NEVER_TOKENS.index("Yes"), simulate.NO_VS_NEVER_TOKENS.index("No")
    assert result["top_gainers"][0] == "Yes"
    assert lp_plus.min() < lp_plus[0] - 1.0  # likelihood displacement of No
    assert prompt[0, yes] < prompt[0, no] and (prompt[:, yes] > prompt[:, no]).any()
    assert {p.name for p in tmp_path.iterdir()} >= {"trajectory.json", "summary.md", "flow.png"}


def test_entry_points_run_in_float64_without_switching_it_on_globally():
    with jax.enable_x64(False):
        stats = claims.alignment_flip(np.random.default_rng(1), instances=10)
        assert not jax.config.read("jax_enable_x64")
    assert stats["max_rel_error_slope_vs_theorem4"] < 1e-8  # float32 would give ~1e-4
