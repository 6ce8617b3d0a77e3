"""State of the unconstrained features model (SPEC §5, paper Section 4.1).

The trainable parameters θ are a dict `{"W": [V, d], "h": [S, d]}`: the unembedding matrix and
one free hidden embedding per distinct prefix ("state"). A `Problem` says, for every response
token, which state predicts it; it never changes along the flow. Prefix sharing is expressed by
pointing two positions at the same state: y+ and y− of a sample share their first state h_x,
while every later prefix h_{x,y<k} (k ≥ 2) is a state of its own.

Samplers draw a population of random instances at once with NumPy (drawing them with jax.random
under vmap costs more compile time than the whole flow); every array then has a leading
`[instances]` axis, ready for `jax.vmap`. The flow code runs under `jax.enable_x64(True)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """The fixed data of a flow: D = {(x_i, y+_i, y−_i)} and an optional tracked response z.

    plus_tokens / plus_states: `[n, L+]` ints, token y+_{i,k} and the row of `h` predicting it.
    minus_tokens / minus_states: `[n, L−]` the same for y−.
    ref_plus / ref_minus: `[n]` fixed reference log-probs ln π_ref(y±_i|x_i).
    reward_plus / reward_minus: `[n]` rewards r(x, y±) (used by REBEL only).
    track_tokens / track_states: `[Lz]` the extra response z of Theorem 7, conditioned on the
        prompt of sample 0 and not in the loss (`Lz = 0` when there is none).
    loss_id: scalar int, which config of a tuple of losses this instance is trained with, so
        one compiled flow serves a population mixing several losses (see `dynamics`).
    """

    plus_tokens: Array
    plus_states: Array
    minus_tokens: Array
    minus_states: Array
    ref_plus: Array
    ref_minus: Array
    reward_plus: Array
    reward_minus: Array
    track_tokens: Array
    track_states: Array
    loss_id: Array

    @property
    def n_samples(self) -> int:
        return self.plus_tokens.shape[0]


def next_token_logprobs(params: Params, states: Array) -> Array:
    """ln π(·|prefix) for each state index in `states` `[...]`: `[..., V]`."""
    return jax.nn.log_softmax(params["h"][states] @ params["W"].T, axis=-1)


def sequence_logprob(params: Params, tokens: Array, states: Array) -> Array:
    """ln π(z|x) = Σ_k ln π(z_k|x, z<k) for tokens/states `[..., L]`: `[...]`."""
    lp = next_token_logprobs(params, states)
    return jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0].sum(-1)


def logprobs(params: Params, problem: Problem) -> tuple[Array, Array]:
    """ln π(y+_i|x_i) and ln π(y−_i|x_i), each `[n]`."""
    return (
        sequence_logprob(params, problem.plus_tokens, problem.plus_states),
        sequence_logprob(params, problem.minus_tokens, problem.minus_states),
    )


def track_logprob(params: Params, problem: Problem) -> Array:
    """ln π(z|x_0) of the tracked response, a scalar."""
    return sequence_logprob(params, problem.track_tokens, problem.track_states)


def with_reference(params: Params, problem: Problem) -> Problem:
    """The problem whose reference is the model at `params` (the paper's choice: π_ref = π_θ(0))."""
    ref_plus, ref_minus = logprobs(params, problem)
    return dataclasses.replace(problem, ref_plus=ref_plus, ref_minus=ref_minus)


with_references = jax.jit(jax.vmap(with_reference))  # a population at once


def float64(fn):
    """Run `fn` with `jax_enable_x64` on, restored afterwards: the flow is checked in float64
    while the rest of ld_jax runs fp32, so x64 is never switched on at import."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapped


def take(tree, i: int):
    """Instance i of a population (any pytree with a leading `[instances]` axis)."""
    return jax.tree.map(lambda a: a[i], tree)


def prefix_states(len_plus: int, len_minus: int, len_track: int = 0) -> tuple[np.ndarray, ...]:
    """State indices of one sample's y+, y− and z `[L±]`, `[Lz]`, and the number of states.

    h[0] = h_x (shared by y+, y− and z), then y+'s prefixes k ≥ 2, then y−'s, then z's.
    """
    lengths, states, offset = (len_plus, len_minus, len_track), [], 1
    for n in lengths:
        states.append(np.concatenate([[0], offset + np.arange(max(n - 1, 0))])[:n].astype(np.int32))
        offset += max(n - 1, 0)
    return (*states, offset)


def _scaled_normal(rng: np.random.Generator, shape: tuple[int, ...], scale_range) -> np.ndarray:
    """N(0, s²) entries, one s ~ U(scale_range) per instance (axis 0), so populations mix regimes."""
    s = rng.uniform(*scale_range, size=(shape[0],) + (1,) * (len(shape) - 1))
    return s * rng.standard_normal(shape)


def population(params: dict, problem: dict, n_losses: int = 1) -> tuple[Params, Problem]:
    """NumPy arrays with a leading `[instances]` axis -> jax arrays of a population.

    `problem` holds the token and state fields; by default there is no tracked response, rewards
    are zero, instance i uses loss `i % n_losses`, and each reference is set to the instance's
    initial model.
    """
    n, samples = problem["plus_tokens"].shape[:2]
    zeros, empty = np.zeros((n, samples)), np.zeros((n, 0), np.int32)
    defaults = {
        "reward_plus": zeros,
        "reward_minus": zeros,
        "ref_plus": zeros,
        "ref_minus": zeros,
        "track_tokens": empty,
        "track_states": empty,
        "loss_id": np.arange(n) % n_losses,
    }
    params = {k: jnp.asarray(v) for k, v in params.items()}
    problem = Problem(**{k: jnp.asarray(v) for k, v in (defaults | problem).items()})
    return params, with_references(params, problem)


def single_sample(
    rng: np.random.Generator,
    instances: int,
    vocab: int,
    dim: int,
    len_plus: int = 1,
    len_minus: int = 1,
    len_track: int = 0,
    n_losses: int = 1,
    w_scale: tuple[float, float] = (0.3, 1.0),
    h_scale: tuple[float, float] = (0.3, 1.0),
) -> tuple[Params, Problem]:
    """Random one-sample instances (x, y+, y−), y+_1 ≠ y−_1, with a tracked z, z_1 ∉ {y+_1, y−_1}.

    Lengths 1 give the single-token setting of Theorems 4 and 5. Instance i uses loss
    `i % n_losses`.
    """
    if vocab < 3:
        raise ValueError("need at least 3 tokens for distinct y+_1, y−_1, z_1")
    n = instances
    first = np.argsort(rng.random((n, vocab)), axis=1)[:, :3]  # three distinct tokens each

    def response(length, head):
        return np.concatenate([head[:, None], rng.integers(0, vocab, (n, length - 1))], 1)[
            :, :length
        ]

    s_plus, s_minus, s_track, n_states = prefix_states(len_plus, len_minus, len_track)
    batch = lambda a: np.broadcast_to(a, (n,) + a.shape)  # noqa: E731
    params = {
        "W": _scaled_normal(rng, (n, vocab, dim), w_scale),
        "h": _scaled_normal(rng, (n, n_states, dim), h_scale),
    }
    problem = {
        "plus_tokens": response(len_plus, first[:, 0])[:, None],
        "plus_states": batch(s_plus[None]),
        "minus_tokens": response(len_minus, first[:, 1])[:, None],
        "minus_states": batch(s_minus[None]),
    }
    if len_track:
        problem |= {
            "track_tokens": response(len_track, first[:, 2]),
            "track_states": batch(s_track),
        }
    return population(params, problem, n_losses)


def many_samples(
    rng: np.random.Generator,
    instances: int,
    vocab: int,
    dim: int,
    samples: int,
    shared: float = 0.5,
    n_losses: int = 1,
    w_scale: tuple[float, float] = (0.3, 1.0),
    h_scale: tuple[float, float] = (0.3, 1.0),
) -> tuple[Params, Problem]:
    """Random datasets of `samples` samples with distinct prompts, single-token responses
    (Theorems 8 and 9).

    h_{x_i} = shared·μ + noise_i, so prompts' hidden embeddings tend to have positive inner
    products, as the paper measures for real models. Tokens repeat across samples (small
    vocab), which exercises the indicator terms of α_{x,x̃}.
    """
    n = instances
    pairs = np.argsort(rng.random((n, samples, vocab)), axis=2)[:, :, :2]
    mu = _scaled_normal(rng, (n, 1, dim), h_scale)
    params = {
        "W": _scaled_normal(rng, (n, vocab, dim), w_scale),
        "h": shared * mu + _scaled_normal(rng, (n, samples, dim), h_scale),
    }
    idx = np.broadcast_to(np.arange(samples, dtype=np.int32)[None, :, None], (n, samples, 1))
    problem = {
        "plus_tokens": pairs[:, :, :1],
        "plus_states": idx,
        "minus_tokens": pairs[:, :, 1:],
        "minus_states": idx,
    }
    return population(params, problem, n_losses)
