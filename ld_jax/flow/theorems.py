"""Closed forms of Theorems 4–9 and Propositions 1–2 (SPEC §5, paper Appendices F–H).

Each function takes one instance (params, problem, loss config) and returns a dict of named
terms whose `rate` entry is the closed-form d/dt ln π(·|x). The terms follow the gradient
structure of the unconstrained features model: the h-gradient of ln π(z|x) at position k is
Wᵀ g_{z,k} with g_{z,k} = e_{z_k} − π(·|x, z<k), and its W-gradient is Σ_k g_{z,k} h_{x,z<k}ᵀ.
Nothing here differentiates through θ: ℓ′ is the scalar slope of ℓ at the current margin.

Names after the paper: `m` (non-negative term), `unembedding_alignment` (−(1−π(y+)+π(y−))
⟨W_{y+}, W_{y−}⟩), `other_token_alignment` (−Σ_{z∉{y±}} π(z)⟨W_z, W_{y+} − W_{y−}⟩), `S` (their
sum, eq. 3), `pref_dispref_hidden` / `pref_pref_hidden` (the α-weighted hidden-embedding sums),
`alpha_minus` / `alpha_plus` (the coefficients α∓_{k,k′}).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ld_jax.flow.dynamics import LossSpec, chosen, configs, loss_slopes
from ld_jax.flow.state import Params, Problem

Array = jax.Array


def _geometry(params: Params, tokens: Array, states: Array) -> tuple[Array, Array, Array]:
    """Next-token probabilities p `[L, V]`, g = e_{z_k} − p `[L, V]` and states h `[L, d]`."""
    h = params["h"][states]
    p = jax.nn.softmax(h @ params["W"].T, axis=-1)
    return p, jax.nn.one_hot(tokens, p.shape[-1], dtype=p.dtype) - p, h


def _first_token_terms(W: Array, p: Array, y_plus: Array, y_minus: Array) -> dict[str, Array]:
    """The first-position (shared h_x) h-gradient terms of Theorems 4, 6 and 8.

    ⟨Wᵀg_{y+,1}, W_{y+} − W_{y−}⟩ = (1−p_{y+})‖W_{y+}‖² + p_{y−}‖W_{y−}‖² + S.
    """
    w_plus, w_minus = W[y_plus], W[y_minus]
    others = 1.0 - jax.nn.one_hot(y_plus, W.shape[0]) - jax.nn.one_hot(y_minus, W.shape[0])
    return {
        "m_unembedding": (1 - p[y_plus]) * w_plus @ w_plus + p[y_minus] * w_minus @ w_minus,
        "unembedding_alignment": -(1 - p[y_plus] + p[y_minus]) * (w_plus @ w_minus),
        "other_token_alignment": -jnp.sum(others * p * (W @ (w_plus - w_minus))),
    }


def _ell_prime(params: Params, problem: Problem, spec: LossSpec) -> Array:
    """ℓ′_i `[n]`: the slope of the preference loss in the margin. It is −∂ℓ/∂ln π(y−), which an
    SFT term (on y+ only) leaves untouched."""
    return -loss_slopes(params, problem, spec)[1]


def theorem4(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(y+|x), one sample, single-token responses."""
    W, h = params["W"], params["h"][0]
    p = jax.nn.softmax(W @ h)
    y_plus, y_minus = problem.plus_tokens[0, 0], problem.minus_tokens[0, 0]
    terms = _first_token_terms(W, p, y_plus, y_minus)
    terms["m"] = terms.pop("m_unembedding") + (1 - p[y_plus] + p[y_minus]) * h @ h
    terms["ell_prime"] = _ell_prime(params, problem, spec)[0]
    inner = terms["m"] + terms["unembedding_alignment"] + terms["other_token_alignment"]
    terms["rate"] = -terms["ell_prime"] * inner
    return terms


def theorem5(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(z|x) for every token z `[V]`; valid for z ∉ {y+, y−} (`valid` marks them)."""
    W, h = params["W"], params["h"][0]
    p = jax.nn.softmax(W @ h)
    y_plus, y_minus = problem.plus_tokens[0, 0], problem.minus_tokens[0, 0]
    alignment = W @ (W[y_plus] - W[y_minus])  # ⟨W_z, W_{y+} − W_{y−}⟩, [V]
    c = (p[y_minus] - p[y_plus]) * h @ h - p @ alignment
    ell_prime = _ell_prime(params, problem, spec)[0]
    valid = (jnp.arange(W.shape[0]) != y_plus) & (jnp.arange(W.shape[0]) != y_minus)
    return {
        "alignment": alignment,
        "c": c,
        "ell_prime": ell_prime,
        "valid": valid,
        "rate": -ell_prime * (alignment + c),
    }


def _multi_token_terms(params: Params, problem: Problem) -> dict[str, Array]:
    """Theorem 6's bracket for sample 0 (one sample, y+_1 ≠ y−_1), without the factor −ℓ′."""
    W = params["W"]
    p_plus, g_plus, h_plus = _geometry(params, problem.plus_tokens[0], problem.plus_states[0])
    _, g_minus, h_minus = _geometry(params, problem.minus_tokens[0], problem.minus_states[0])
    y_plus = problem.plus_tokens[0]
    terms = _first_token_terms(W, p_plus[0], y_plus[0], problem.minus_tokens[0, 0])
    # h-gradient at the later (unshared) prefixes of y+: ‖W_{y+_k} − Σ_z π(z|x, y+<k) W_z‖².
    later = W[y_plus[1:]] - p_plus[1:] @ W
    terms["m"] = terms.pop("m_unembedding") + jnp.sum(later * later)
    terms["S"] = terms["unembedding_alignment"] + terms["other_token_alignment"]
    terms["alpha_minus"] = g_plus @ g_minus.T  # [L+, L−]
    terms["alpha_plus"] = g_plus @ g_plus.T  # [L+, L+]
    terms["pref_dispref_hidden"] = -jnp.sum(terms["alpha_minus"] * (h_plus @ h_minus.T))
    terms["pref_pref_hidden"] = jnp.sum(terms["alpha_plus"] * (h_plus @ h_plus.T))
    terms["bracket"] = (
        terms["m"] + terms["S"] + terms["pref_dispref_hidden"] + terms["pref_pref_hidden"]
    )
    return terms


def theorem6(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(y+|x), one sample, multi-token responses with y+_1 ≠ y−_1."""
    terms = _multi_token_terms(params, problem)
    terms["ell_prime"] = _ell_prime(params, problem, spec)[0]
    terms["rate"] = -terms["ell_prime"] * terms["bracket"]
    return terms


def theorem7(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(z|x) for the tracked response z (z_1 ∉ {y+_1, y−_1}) of a one-sample problem."""
    W = params["W"]
    _, g_plus, h_plus = _geometry(params, problem.plus_tokens[0], problem.plus_states[0])
    _, g_minus, h_minus = _geometry(params, problem.minus_tokens[0], problem.minus_states[0])
    p_z, g_z, h_z = _geometry(params, problem.track_tokens, problem.track_states)
    delta = W[problem.plus_tokens[0, 0]] - W[problem.minus_tokens[0, 0]]
    terms = {
        "c": -p_z[0] @ (W @ delta),
        "first_token_alignment": W[problem.track_tokens[0]] @ delta,
        "beta_minus": g_z @ g_minus.T,  # [Lz, L−]
        "beta_plus": g_z @ g_plus.T,  # [Lz, L+]
    }
    terms["z_dispref_hidden"] = -jnp.sum(terms["beta_minus"] * (h_z @ h_minus.T))
    terms["z_pref_hidden"] = jnp.sum(terms["beta_plus"] * (h_z @ h_plus.T))
    terms["ell_prime"] = _ell_prime(params, problem, spec)[0]
    bracket = sum(
        terms[k] for k in ("c", "first_token_alignment", "z_dispref_hidden", "z_pref_hidden")
    )
    terms["rate"] = -terms["ell_prime"] * bracket
    return terms


def _single_token_dataset(params: Params, problem: Problem, spec: LossSpec):
    """p(·|x_i) `[n, V]`, y± `[n]`, Gram ⟨h_{x_i}, h_{x_j}⟩ `[n, n]`, and −ℓ′_j/|D| `[n]`."""
    h = params["h"][problem.plus_states[:, 0]]
    p = jax.nn.softmax(h @ params["W"].T, axis=-1)
    weight = -_ell_prime(params, problem, spec) / problem.n_samples
    return p, problem.plus_tokens[:, 0], problem.minus_tokens[:, 0], h @ h.T, weight


def theorem8(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(y+_i|x_i) for every sample `[n]`: single tokens, distinct prompts."""
    W = params["W"]
    p, y_plus, y_minus, gram, weight = _single_token_dataset(params, problem, spec)
    first = jax.vmap(_first_token_terms, in_axes=(None, 0, 0, 0))(W, p, y_plus, y_minus)
    m = first["m_unembedding"] + (1 - _pick(p, y_plus) + _pick(p, y_minus)) * jnp.diag(gram)
    S = first["unembedding_alignment"] + first["other_token_alignment"]
    # α_{x,x̃} = 1[y+ = ỹ+] − 1[y+ = ỹ−] + π(ỹ−|x) − π(ỹ+|x), rows x, columns x̃.
    alpha = (
        (y_plus[:, None] == y_plus[None, :]).astype(p.dtype)
        - (y_plus[:, None] == y_minus[None, :]).astype(p.dtype)
        + p[:, y_minus]
        - p[:, y_plus]
    )
    off_diagonal = 1.0 - jnp.eye(problem.n_samples, dtype=p.dtype)
    cross = (off_diagonal * alpha * gram) @ weight
    return {
        "m": m,
        "S": S,
        "alpha": alpha,
        "same_sample": weight * (m + S),
        "other_samples": cross,
        "rate": weight * (m + S) + cross,
    }


def theorem9(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(z|x_i) for every sample and token `[n, V]`: single tokens, distinct prompts."""
    W = params["W"]
    p, y_plus, y_minus, gram, weight = _single_token_dataset(params, problem, spec)
    alignment = (W[y_plus] - W[y_minus]) @ W.T  # ⟨W_z, W_{y+_i} − W_{y−_i}⟩, [n, V]
    same = weight[:, None] * (alignment - jnp.sum(p * alignment, -1, keepdims=True))
    # coefficient of sample j on prompt i, token z: 1[z = ỹ+_j] − 1[z = ỹ−_j] − π(ỹ+_j|x_i) + π(ỹ−_j|x_i)
    vocab = W.shape[0]
    indicator = jax.nn.one_hot(y_plus, vocab) - jax.nn.one_hot(y_minus, vocab)  # [n_j, V]
    shift = p[:, y_minus] - p[:, y_plus]  # [n_i, n_j]
    coef = indicator[None, :, :] + shift[:, :, None]  # [n_i, n_j, V]
    samples = jnp.einsum("ijz,ij,j->iz", coef, gram, weight)
    return {"same_sample": same, "samples": samples, "rate": same + samples}


def _pick(p: Array, tokens: Array) -> Array:
    """p[i, tokens[i]] for p `[n, V]`, tokens `[n]`: `[n]`."""
    return jnp.take_along_axis(p, tokens[:, None], axis=-1)[:, 0]


def grad_norm_sq_plus(params: Params, problem: Problem) -> Array:
    """‖∇ ln π(y+|x)‖² for sample 0: Σ_k ‖Wᵀg_{y+,k}‖² (h-part; y+'s prefixes are distinct
    states) + ‖Σ_k g_{y+,k} h_kᵀ‖²_F = Σ_{k,k′} α+_{k,k′}⟨h_k, h_k′⟩ (W-part)."""
    _, g, h = _geometry(params, problem.plus_tokens[0], problem.plus_states[0])
    wg = g @ params["W"]
    return jnp.sum(wg * wg) + jnp.sum((g @ g.T) * (h @ h.T))


def proposition1(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(y+|x) = E(θ) + λ‖∇ ln π(y+|x)‖² under ℓ(u) − λ ln π(y+|x) (one sample)."""
    length = problem.plus_tokens.shape[1]
    lam = chosen(spec, problem, lambda c: c.sft_lambda / (length if c.sft_length_average else 1))
    E = theorem6(params, problem, spec)["rate"]
    norm_sq = grad_norm_sq_plus(params, problem)
    return {"E": E, "grad_norm_sq": norm_sq, "lambda": lam, "rate": E + lam * norm_sq}


def proposition2(params: Params, problem: Problem, spec: LossSpec) -> dict[str, Array]:
    """d/dt ln π(y+|x) = ρ E(θ) + γ ‖∇ ln π(y+|x)‖² under ℓ(λ+ ln π(y+) − λ− ln π(y−)).

    For the `weighted` loss with constant λ± (other losses read as λ± = 1): μ′ = ℓ′ at the
    weighted margin, E uses ℓ′ at the unweighted margin (the same loss with λ± = 1),
    ρ = λ− μ′/ℓ′, γ = (λ+ − λ−)(−μ′).
    """
    lam_plus = chosen(spec, problem, lambda c: c.weight_chosen)
    lam_minus = chosen(spec, problem, lambda c: c.weight_rejected)
    mu_prime = -loss_slopes(params, problem, spec)[1][0] / lam_minus
    unweighted = tuple(
        dataclasses.replace(c, weight_chosen=1.0, weight_rejected=1.0) for c in configs(spec)
    )
    six = theorem6(params, problem, unweighted)
    rho = lam_minus * mu_prime / six["ell_prime"]
    gamma = (lam_plus - lam_minus) * (-mu_prime)
    norm_sq = grad_norm_sq_plus(params, problem)
    return {
        "E": six["rate"],
        "rho": rho,
        "gamma": gamma,
        "mu_prime": mu_prime,
        "grad_norm_sq": norm_sq,
        "rate": rho * six["rate"] + gamma * norm_sq,
    }


def ches(params: Params, problem: Problem) -> Array:
    """CHES_x(y+, y−) = ⟨H+, H−⟩ − ‖H+‖² of sample 0 (Definition 2), H± = Σ_k h_{x,y±<k}."""
    h_plus = params["h"][problem.plus_states[0]].sum(0)
    h_minus = params["h"][problem.minus_states[0]].sum(0)
    return h_plus @ h_minus - h_plus @ h_plus
