"""The training loss over a `Problem` and its gradient flow dθ/dt = −∇L(θ) (SPEC §5).

L(θ) = (1/|D|) Σ_i ℓ_i, with ℓ_i any loss of `ld_jax.losses` (plain, SFT-regularised or
weighted) applied to the sequence log-probs of sample i and its fixed reference. `spec` is one
`LossConfig`, or a tuple of them of which `problem.loss_id` picks one: a population vmapped
through one compiled flow can then mix losses (a flow's compile costs far more than its run). The flow is
integrated with diffrax (adaptive Tsit5) or by small-step gradient descent, to show the step → 0
limit. All functions are pure, jit-able and vmappable over instances.

`rate` is the ground truth the closed forms are checked against: for any q(θ),
dq/dt = ⟨∇q, −∇L⟩, computed as one forward-mode product (jvp) along the velocity −∇L.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from ld_jax.flow.state import Params, Problem, logprobs
from ld_jax.losses import LossConfig, preference_loss

Array = jax.Array
LossSpec = LossConfig | tuple[LossConfig, ...]


def configs(spec: LossSpec) -> tuple[LossConfig, ...]:
    return spec if isinstance(spec, tuple) else (spec,)


def chosen(spec: LossSpec, problem: Problem, field: Callable[[LossConfig], float]) -> Array:
    """field(cfg) for the loss config this problem is trained with, a scalar."""
    return jnp.asarray([field(c) for c in configs(spec)])[problem.loss_id]


def sample_losses(spec: LossSpec, problem: Problem, lp_plus: Array, lp_minus: Array) -> Array:
    """ℓ_i for sequence log-probs `[n]` of y+ and y−: `[n]`."""
    per_config = jnp.stack([_losses(c, problem, lp_plus, lp_minus) for c in configs(spec)])
    return per_config[problem.loss_id]


def _losses(cfg: LossConfig, problem: Problem, lp_plus: Array, lp_minus: Array) -> Array:
    n = problem.n_samples
    losses, _ = preference_loss(
        cfg,
        lp_plus,
        lp_minus,
        problem.ref_plus,
        problem.ref_minus,
        chosen_len=jnp.full(n, problem.plus_tokens.shape[1], lp_plus.dtype),
        rejected_len=jnp.full(n, problem.minus_tokens.shape[1], lp_plus.dtype),
        reward_chosen=problem.reward_plus,
        reward_rejected=problem.reward_minus,
    )
    return losses


def loss(params: Params, problem: Problem, spec: LossSpec) -> Array:
    """L(θ) = mean_i ℓ_i, a scalar."""
    return sample_losses(spec, problem, *logprobs(params, problem)).mean()


def loss_slopes(params: Params, problem: Problem, spec: LossSpec) -> tuple[Array, Array]:
    """∂ℓ_i/∂ln π(y+_i|x_i) and ∂ℓ_i/∂ln π(y−_i|x_i), each `[n]` (scalar calculus, no θ).

    For a loss of the margin u these are ℓ′(u) and −ℓ′(u); an SFT term adds −λ to the first,
    weights λ± multiply them by λ± (paper Appendix G).
    """
    lp_plus, lp_minus = logprobs(params, problem)
    total = lambda a, b: sample_losses(spec, problem, a, b).sum()  # noqa: E731 (ℓ_i are separate)
    return jax.grad(total, argnums=(0, 1))(lp_plus, lp_minus)


def velocity(params: Params, problem: Problem, spec: LossSpec) -> Params:
    """dθ/dt = −∇L(θ), a pytree like `params`."""
    return jax.tree.map(jnp.negative, jax.grad(loss)(params, problem, spec))


def rate(q: Callable[[Params], Array], params: Params, problem: Problem, spec: LossSpec) -> Array:
    """Autodiff d/dt q(θ(t)) = ⟨∇q(θ), −∇L(θ)⟩, shaped like q's output."""
    return jax.jvp(q, (params,), (velocity(params, problem, spec),))[1]


@functools.partial(
    jax.jit, static_argnames=("spec", "n_save", "rtol", "atol", "max_steps", "progress")
)
def integrate(
    params: Params,
    problem: Problem,
    spec: LossSpec,
    t1: Array | float,
    n_save: int = 8,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 100_000,
    progress: bool = False,
) -> tuple[Array, Params]:
    """Gradient flow from θ(0) = params to t1 with adaptive Tsit5.

    Returns the save times `[n_save]` (t = 0 and evenly spaced up to t1) and θ at those times,
    a pytree with a leading `[n_save]` axis. `t1` may differ per instance under vmap.
    `progress` shows diffrax's tqdm bar (single instances only).
    """
    ts = jnp.linspace(0.0, 1.0, n_save) * t1
    term = diffrax.ODETerm(lambda t, y, args: velocity(y, problem, spec))
    sol = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        t0=0.0,
        t1=t1,
        dt0=None,
        y0=params,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        progress_meter=diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
    )
    return sol.ts, sol.ys


@functools.partial(jax.jit, static_argnames=("spec",))
def gradient_descent(
    params: Params, problem: Problem, spec: LossSpec, step: Array | float, n_steps: Array | int
) -> Params:
    """θ after `n_steps` of θ ← θ − step·∇L(θ); it reaches the flow at t = n_steps·step as step → 0."""

    def body(_, theta):
        return jax.tree.map(lambda p, v: p + step * v, theta, velocity(theta, problem, spec))

    return jax.lax.fori_loop(0, n_steps, body, params)
