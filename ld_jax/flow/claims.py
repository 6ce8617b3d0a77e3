"""The paper's qualitative claims, reproduced on populations of random instances (SPEC §5).

Every rate here is the autodiff d/dt ln π = ⟨∇ ln π, −∇L⟩ at t = 0 (not a closed form), so the
claims are checked against the dynamics themselves:

(a) `alignment_flip`: with everything else in Theorem 4 held fixed, d/dt ln π(y+) falls linearly
    as ⟨W_{y+}, W_{y−}⟩ grows and changes sign.
(b) `mass_ranking`: in the single-token setting the tokens gaining most are ranked exactly by
    ⟨W_z, W_{y+} − W_{y−}⟩ (Spearman 1).
(c) `ches_correlation`: over multi-token instances (α set by the model), higher CHES goes with a
    more negative initial d/dt ln π(y+).
(d) `contradicting_sample`: adding (x̃, ỹ+, ỹ− = y+) makes d/dt ln π(y+|x) more negative than
    adding the same sample with a different ỹ−.
`gd_convergence` shows small-step gradient descent reaching the diffrax flow as step → 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from ld_jax.flow import dynamics, state, theorems
from ld_jax.flow.state import Params, Problem
from ld_jax.losses import LossConfig

Array = jax.Array
DPO = LossConfig("dpo", beta=0.1)


@functools.partial(jax.jit, static_argnames=("spec",))
def rate_y_plus(params: Params, problem: Problem, spec=DPO) -> Array:
    """Autodiff d/dt ln π(y+_0|x_0) at θ for a population: `[instances]`."""

    def one(p, pr):
        return dynamics.rate(lambda theta: state.logprobs(theta, pr)[0][0], p, pr, spec)

    return jax.vmap(one)(params, problem)


@state.float64
def alignment_flip(rng: np.random.Generator, instances: int = 200, grid: int = 11) -> dict:
    """(a) Sweep ⟨W_{y+}, W_{y−}⟩ with p(·|x), ‖W_{y±}‖, ‖h_x‖ and every ⟨W_z, W_{y+} − W_{y−}⟩
    (z ∉ {y±}) held fixed, and watch the sign of d/dt ln π(y+|x) at t = 0.

    Geometry: h_x, the other tokens and parts P± of W_{y±} live in a subspace U; W_{y±} = P± + q±
    with q± of norm ρ in a plane orthogonal to U, at an angle swept by cos φ ∈ [−1, 1]. Only
    ⟨q+, q−⟩ changes, so Theorem 4 predicts a slope of ℓ′(1 − π(y+) + π(y−)) < 0. As in the
    No-vs-Never example, one likely token z* is aligned with P+ − P− (that makes the fixed rest
    displacement-prone, which a sign flip needs: at q+ = q− the rate is the rest's alone).
    """
    vocab, dim_u, rho = 8, 6, 2.0
    n, cos = instances, np.linspace(-1.0, 1.0, grid)
    p_plus, p_minus = 0.5 * rng.standard_normal((2, n, dim_u))
    delta = (p_plus - p_minus) / np.linalg.norm(p_plus - p_minus, axis=-1, keepdims=True)
    w_star = rng.uniform(2.0, 5.0, (n, 1)) * delta + 0.3 * rng.standard_normal((n, dim_u))
    h = rng.uniform(0.3, 0.8, (n, 1)) * w_star / np.linalg.norm(w_star, axis=-1, keepdims=True)
    h = h + 0.1 * rng.standard_normal((n, dim_u))
    others = 0.5 * rng.standard_normal((n, vocab - 3, dim_u))
    W_u = np.concatenate([p_plus[:, None], p_minus[:, None], w_star[:, None], others], 1)

    # Every instance at every grid point: [n·grid] problems, grid fastest.
    W = np.zeros((n, grid, vocab, dim_u + 2))
    W[..., :dim_u] = W_u[:, None]
    W[:, :, 0, dim_u] = rho
    W[:, :, 1, dim_u], W[:, :, 1, dim_u + 1] = rho * cos, rho * np.sqrt(1 - cos**2)
    H = np.zeros((n, grid, 1, dim_u + 2))
    H[..., :dim_u] = h[:, None, None]
    W, H = W.reshape(n * grid, vocab, -1), H.reshape(n * grid, 1, -1)
    one = np.zeros((n * grid, 1, 1), np.int64)
    params, problem = state.population(
        {"W": W, "h": H},
        {"plus_tokens": one, "plus_states": one, "minus_tokens": one + 1, "minus_states": one},
    )
    rates = np.asarray(rate_y_plus(params, problem)).reshape(n, grid)
    inner = np.einsum("nd,nd->n", W[:, 0], W[:, 1]).reshape(n, grid)
    probs = np.asarray(jax.nn.softmax(jnp.einsum("nvd,nd->nv", W, H[:, 0]))).reshape(n, grid, vocab)
    # Theorem 4's slope in ⟨W+, W−⟩ with the rest fixed: ℓ′(1 − π(y+) + π(y−)), ℓ′ = −β/2 at t = 0.
    predicted = -DPO.beta / 2 * (1 - probs[:, 0, 0] + probs[:, 0, 1])
    measured = (rates[:, -1] - rates[:, 0]) / (inner[:, -1] - inner[:, 0])
    flips = (rates[:, 0] > 0) & (rates[:, -1] < 0)
    return {
        "instances": n,
        "grid": grid,
        "fraction_sign_flips": float(flips.mean()),
        "fraction_positive_at_least_alignment": float((rates[:, 0] > 0).mean()),
        "fraction_negative_at_most_alignment": float((rates[:, -1] < 0).mean()),
        "fraction_strictly_decreasing": float((np.diff(rates, axis=1) < 0).all(1).mean()),
        "max_probability_drift": float(np.abs(probs - probs[:, :1]).max()),
        "max_rel_error_slope_vs_theorem4": float(np.abs(measured / predicted - 1).max()),
    }


@state.float64
def mass_ranking(
    rng: np.random.Generator, instances: int = 500, vocab: int = 12, dim: int = 8
) -> dict:
    """(b) Spearman(⟨W_z, W_{y+} − W_{y−}⟩, d/dt ln π(z|x)) over z ∉ {y+, y−}, per instance."""
    params, problem = state.single_sample(rng, instances, vocab, dim)
    rates = jax.jit(
        jax.vmap(
            lambda p, pr: dynamics.rate(
                lambda theta: state.next_token_logprobs(theta, pr.plus_states[0, 0]), p, pr, DPO
            )
        )
    )(params, problem)
    W, y_plus, y_minus = (
        np.asarray(a) for a in (params["W"], problem.plus_tokens, problem.minus_tokens)
    )
    rho = []
    for i in range(instances):
        keep = np.setdiff1d(np.arange(vocab), [y_plus[i, 0, 0], y_minus[i, 0, 0]])
        alignment = W[i, keep] @ (W[i, y_plus[i, 0, 0]] - W[i, y_minus[i, 0, 0]])
        rho.append(spearmanr(alignment, np.asarray(rates[i])[keep]).statistic)
    rho = np.asarray(rho)
    return {
        "instances": instances,
        "min_spearman": float(rho.min()),
        "mean_spearman": float(rho.mean()),
    }


def ches_population(
    rng: np.random.Generator,
    instances: int,
    length: int = 4,
    vocab: int = 12,
    dim: int = 8,
    omega: float | None = None,
):
    """Multi-token instances whose y− resembles y+ to a degree ω (default ω ~ U(0, 1.5)):
    y−_k = y+_k with probability min(ω, 1) (k ≥ 2; y−_1 ≠ y+_1), and
    h_{x,y−<k} = ω h_{x,y+<k} + √max(0, 1−ω²)·noise, so ω > 1 gives y− longer, aligned states.

    Hidden embeddings are ~10x longer than token unembeddings, as for real LMs after the final
    norm; with equal scales the W-gradient terms that CHES summarises are weaker.
    """
    params, problem = state.single_sample(
        rng, instances, vocab, dim, length, length, w_scale=(0.1, 0.3), h_scale=(1.0, 3.0)
    )
    omega = rng.uniform(0, 1.5, (instances, 1)) if omega is None else np.full((instances, 1), omega)
    plus, minus = np.asarray(problem.plus_tokens[:, 0]), np.array(problem.minus_tokens[:, 0])
    same = rng.random(minus.shape) < omega
    same[:, 0] = False
    minus[same] = plus[same]
    h = np.array(params["h"])  # states: [h_x, y+ prefixes 2..L, y− prefixes 2..L]
    later_plus, later_minus = slice(1, length), slice(length, 2 * length - 1)
    noise = rng.standard_normal(h[:, later_minus].shape) * np.abs(h[:, later_plus]).mean(
        (1, 2), keepdims=True
    )
    w = omega[:, :, None]
    h[:, later_minus] = w * h[:, later_plus] + np.sqrt(np.maximum(0.0, 1 - w**2)) * noise
    params = {"W": params["W"], "h": jnp.asarray(h)}
    problem = dataclasses.replace(problem, minus_tokens=jnp.asarray(minus[:, None]))
    return params, state.with_references(params, problem)


@state.float64
def ches_correlation(rng: np.random.Generator, instances: int = 1000) -> dict:
    """(c) Spearman(CHES, d/dt ln π(y+) at t = 0) over random multi-token instances."""
    params, problem = ches_population(rng, instances)
    rates = np.asarray(rate_y_plus(params, problem))
    ches = np.asarray(jax.jit(jax.vmap(theorems.ches))(params, problem))
    six = jax.jit(jax.vmap(lambda p, pr: theorems.theorem6(p, pr, DPO)))(params, problem)
    alphas = np.concatenate(
        [np.asarray(six["alpha_minus"]).ravel(), np.asarray(six["alpha_plus"]).ravel()]
    )
    return {
        "instances": instances,
        "spearman_ches_vs_rate": float(spearmanr(ches, rates).statistic),
        "fraction_alpha_positive": float((alphas > 0).mean()),
        "fraction_rate_negative": float((rates < 0).mean()),
    }


@state.float64
def contradicting_sample(rng: np.random.Generator, instances: int = 1000, samples: int = 3) -> dict:
    """(d) d/dt ln π(y+_0|x_0) with an extra sample (x̃, ỹ+, ỹ− = y+_0) against the same extra
    sample with ỹ− ∉ {y+_0, ỹ+}; the other samples and all embeddings are shared."""
    vocab = 6
    params, problem = state.many_samples(rng, instances, vocab, 8, samples + 1)
    plus, minus = np.asarray(problem.plus_tokens), np.array(problem.minus_tokens)
    y0 = plus[:, 0, 0]
    extra_plus = (y0 + rng.integers(1, vocab, instances)) % vocab  # ≠ y+_0
    plus = plus.copy()
    plus[:, -1, 0] = extra_plus
    contra = minus.copy()
    contra[:, -1, 0] = y0
    # a third token, neither y+_0 nor ỹ+
    free = np.argsort(
        rng.random((instances, vocab)) + np.eye(vocab)[y0] + np.eye(vocab)[extra_plus], 1
    )
    neutral = minus.copy()
    neutral[:, -1, 0] = free[:, 0]

    def rate_with(minus_tokens):
        pr = dataclasses.replace(
            problem, plus_tokens=jnp.asarray(plus), minus_tokens=jnp.asarray(minus_tokens)
        )
        return np.asarray(rate_y_plus(params, state.with_references(params, pr)))

    r_contra, r_neutral = rate_with(contra), rate_with(neutral)
    h = np.asarray(params["h"])
    positive = np.einsum("nd,nd->n", h[:, 0], h[:, -1]) > 0
    more_negative = r_contra < r_neutral
    return {
        "instances": instances,
        "fraction_more_negative": float(more_negative.mean()),
        "fraction_more_negative_when_hidden_ip_positive": float(more_negative[positive].mean()),
        "fraction_hidden_ip_positive": float(positive.mean()),
        "mean_rate_contradicting": float(r_contra.mean()),
        "mean_rate_non_contradicting": float(r_neutral.mean()),
    }


@state.float64
def gd_convergence(
    rng: np.random.Generator, instances: int = 4, steps=(25, 50, 100, 200, 400, 800)
) -> list[dict]:
    """Max |θ_GD − θ_ODE| at t1 over multi-token instances, for GD with step t1/N."""
    params, problem = state.single_sample(rng, instances, 12, 8, 3, 4)
    t1 = 10.0
    _, ode = jax.jit(
        jax.vmap(lambda p, pr: dynamics.integrate(p, pr, DPO, t1, n_save=2, rtol=1e-12, atol=1e-12))
    )(params, problem)
    ode = jax.tree.map(lambda a: a[:, -1], ode)  # θ(t1) of each instance
    gd = jax.jit(
        jax.vmap(
            lambda p, pr, n: dynamics.gradient_descent(p, pr, DPO, t1 / n, n), in_axes=(0, 0, None)
        )
    )
    rows = []
    for n in steps:
        theta = gd(params, problem, n)
        err = max(
            float(jnp.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(ode))
        )
        rows.append(
            {"steps": n, "step": t1 / n, "max_abs_error": err, "error_over_step": err / (t1 / n)}
        )
    return rows
