"""The jitted step of a Persona run (E1): one DPO/IPO update that also records what the paper's
tables need.

Why a step of its own beside `train.step`: a run is one prompt whose responses are single
tokens, so both log-probs come from one position of one prompt's forward pass (the LM head runs
on that position only), and every step measures the whole next-token distribution on the device
(top gainers, watched tokens, Table 13 geometry) before updating; the optimizer, loss and
models are the library's. Runs are independent and run one after another: vmapping them over a stacked
`[runs]` axis of params measured 1.5x slower per run-step on CPU than this plain step
(benchmarks/persona_step.py), because the layer scan then works on batched weight slices.

A run's batch is a dict of arrays:
    ids [s] int32 prompt right-padded, mask [s], last [] index of the last prompt token,
    y_pos [], y_neg [] token ids, ref_pos [], ref_neg [] reference log-probs, p0 [V] initial
    next-token distribution, watch [n_watch] token ids whose probabilities are recorded, lr [].
Right padding keeps the prompt's positions unchanged, and causal attention never lets a real
position see the padding, so the last prompt position is exactly what an unpadded pass gives.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ld_jax.losses import LossConfig, preference_loss
from ld_jax.train.optim import OptimizerConfig, make_optimizer

Array = jax.Array


def last_position_logprobs(lm, params, ids: Array, mask: Array, last: Array) -> tuple[Array, Array]:
    """Next-token log-probs `[V]` (fp32) and final hidden state h_x `[d]` after prompt `ids` `[s]`."""
    hidden = lm.hidden_states(params, ids[None], mask[None])[0]  # [s, d]
    h = hidden[last]
    logits = lm.logits_from_hidden(params, h[None, None])[0, 0]  # [V]
    # fp32 at least (bf16 logits), float64 kept (the float64 tests)
    return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32))), h


def track(
    lm, params, logp: Array, h: Array, loss: Array, batch: dict, track_k: int
) -> dict[str, Array]:
    """Per-step statistics of one run, all small: the `[V]` distribution never leaves the device.

    Returns scalars loss, logp_pos, logp_neg, w_inner = ⟨W_{y+}, W_{y−}⟩, proj_par / proj_perp =
    norms of the parts of W_{y+} − W_{y−} along W_{y+} and orthogonal to it (paper Table 13),
    h_norm = ‖h_x‖; top_ids / top_inc `[track_k]`: the tokens whose probability rose most since
    the initial model, and by how much; watch_p `[n_watch]`: probabilities of the watched tokens.
    """
    p = jnp.exp(logp)
    top_inc, top_ids = jax.lax.top_k(p - batch["p0"], track_k)
    W = lm.unembedding(params)  # [V, d]
    w_pos, w_neg = W[batch["y_pos"]].astype(jnp.float32), W[batch["y_neg"]].astype(jnp.float32)
    diff = w_pos - w_neg
    unit = w_pos / jnp.linalg.norm(w_pos)
    par = jnp.dot(diff, unit)
    return {
        "loss": loss,
        "logp_pos": logp[batch["y_pos"]],
        "logp_neg": logp[batch["y_neg"]],
        "top_ids": top_ids,
        "top_inc": top_inc,
        "watch_p": p[batch["watch"]],
        "w_inner": jnp.dot(w_pos, w_neg),
        "proj_par": jnp.abs(par),
        "proj_perp": jnp.linalg.norm(diff - par * unit),
        "h_norm": jnp.linalg.norm(h.astype(jnp.float32)),
    }


class RunFns(NamedTuple):
    opt: optax.GradientTransformation
    step: Callable
    measure: Callable
    initial: Callable


_RUN_FNS: dict = {}


def single_token_loss(loss_cfg, logp, batch):
    """The preference loss of one prompt's single-token pair: logp `[V]` ln π(·|x), batch with
    token ids `y_pos`, `y_neg` and reference log-probs `ref_pos`, `ref_neg`."""
    losses, _ = preference_loss(
        loss_cfg,
        logp[batch["y_pos"]][None],
        logp[batch["y_neg"]][None],
        batch["ref_pos"][None],
        batch["ref_neg"][None],
    )
    return losses[0]


def make_run_fns(lm, loss_cfg: LossConfig, opt_cfg: OptimizerConfig, track_k: int) -> RunFns:
    """The optimizer and the jitted functions of one run.

    step(params, opt_state, batch) -> (params, opt_state, metrics): metrics are those of the params
    *before* the update, so step t's loss is L(θ_t). Params and optimizer state are donated.
    measure(params, batch) -> metrics without an update (used for the final step).
    initial(params, ids, mask, last) -> (log-probs `[V]`, h_x `[d]`): the reference pass.

    The optimizer is built with lr = 1 and its update scaled by the batch's `lr`: every optax
    schedule and optimizer used here is linear in the base lr, so this equals building it with
    that lr, and all lrs of the lr search share one compiled step. The functions are memoized
    per model architecture and configs (they take params as arguments), so later experiments in
    the same process reuse their compilations.
    """
    key = (lm.config, loss_cfg, dataclasses.replace(opt_cfg, lr=1.0), track_k)
    if key in _RUN_FNS:
        return _RUN_FNS[key]
    opt = make_optimizer(key[2])

    def loss_fn(params, batch):
        logp, h = last_position_logprobs(lm, params, batch["ids"], batch["mask"], batch["last"])
        return single_token_loss(loss_cfg, logp, batch), (logp, h)

    def one_step(params, opt_state, batch):
        (loss, (logp, h)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        metrics = track(lm, params, logp, h, loss, batch, track_k)
        updates, opt_state = opt.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (batch["lr"] * u).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state, metrics

    def one_measure(params, batch):
        loss, (logp, h) = loss_fn(params, batch)
        return track(lm, params, logp, h, loss, batch, track_k)

    initial = jax.jit(functools.partial(last_position_logprobs, lm))
    _RUN_FNS[key] = RunFns(
        opt, jax.jit(one_step, donate_argnums=(0, 1)), jax.jit(one_measure), initial
    )
    return _RUN_FNS[key]


class Theorem5Fns(NamedTuple):
    rate: Callable
    change: Callable


_T5_FNS: dict = {}


def theorem5_fns(lm, loss_cfg: LossConfig) -> Theorem5Fns:
    """`theorem5_measures` for one prompt of a Persona run batch (memoized per architecture)."""
    key = (lm.config, loss_cfg)
    if key not in _T5_FNS:
        _T5_FNS[key] = theorem5_measures(
            lambda p, b: last_position_logprobs(lm, p, b["ids"], b["mask"], b["last"])[0], loss_cfg
        )
    return _T5_FNS[key]


def theorem5_measures(logp_of: Callable, loss_cfg: LossConfig) -> Theorem5Fns:
    """The measured quantities of the Theorem 5 check (SPEC §5) for a next-token model
    `logp_of(params, batch) -> [V]` log-probs, the batch holding y_pos, y_neg, ref_pos, ref_neg.

    rate(params, batch) -> `[V]`: d/dη ln π(·|x; θ − η∇L(θ)) at η = 0, by a JVP along −∇L: the
        gradient-flow rate of every token's log-prob (autodiff, no step size).
    change(params, batch, eta) -> `[V]`: ln π(·|x) after one plain gradient step of size `eta`
        minus before, measured by two forward passes (at small eta, eta · rate).
    Theorem 5 (single tokens, unconstrained features) says the rate of z ∉ {y+, y−} is
    −ℓ′(⟨W_z, W_{y+} − W_{y−}⟩ + c) with c the same for every z; a real network moves h_x through
    its Jacobian, so the check on real models is a rank correlation (`spearman_excluding`).
    """

    def loss_of(params, batch):
        logp = logp_of(params, batch)
        return single_token_loss(loss_cfg, logp, batch)

    def rate(params, batch):
        down = jax.tree.map(jnp.negative, jax.grad(loss_of)(params, batch))
        return jax.jvp(lambda p: logp_of(p, batch), (params,), (down,))[1]

    def change(params, batch, eta):
        g = jax.grad(loss_of)(params, batch)
        moved = jax.tree.map(lambda p, d: p - (eta * d).astype(p.dtype), params, g)
        return logp_of(moved, batch) - logp_of(params, batch)

    return Theorem5Fns(jax.jit(rate), jax.jit(change))


def spearman_excluding(score, change, exclude) -> float:
    """Spearman rank correlation of `score` and `change` (both `[V]`) over the tokens not in
    `exclude` (y+ and y−, which Theorem 5 does not cover); average ranks for ties."""
    from scipy.stats import rankdata

    keep = np.ones(len(score), bool)
    keep[list(exclude)] = False
    a, b = rankdata(np.asarray(score)[keep]), rankdata(np.asarray(change)[keep])
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
