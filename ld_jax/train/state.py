"""The training state: a pytree of the step counter, parameters and optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    step: jax.Array  # int32 []: batches consumed (micro-batches under gradient accumulation)
    params: Any  # the model's parameter pytree (float32 master weights for mixed precision)
    opt_state: optax.OptState


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def abstract_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state, without allocating it."""
    return jax.eval_shape(lambda p: init_state(p, optimizer), params)
