"""Where activations live on the mesh: every `[batch, ...]` activation split over the batch axes.

    with batch_sharded(NamedSharding(mesh, P(("data", "fsdp")))):   # while tracing a jitted fn
        ...  constrain_batch(h) ...                                   # h [batch, seq, d_model]

Under FSDP the weights are split over "fsdp" on d_model, and the batch over ("data", "fsdp") on
its leading axis. Left alone, XLA's sharding propagation carries the *weights'* layout into the
activations (the embedding lookup's output comes out split on d_model, and the MLP's
`[batch, seq, d_ff]` then replicated on every device): the TPU compiler showed the global batch's
`[64, 128, vocab]` logits live on each chip (docs/scaling.md). A constraint on the residual
stream of every layer and on the LM head's input pins the batch layout, so the weights are the
ones that move (all-gathered per layer), which is what FSDP means.

Outside `batch_sharded` (eager calls, the CHES kernel, tests) `constrain_batch` is the identity,
so the models stay pure functions with no mesh of their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax

_BATCH = contextvars.ContextVar("batch_sharding", default=None)


@contextlib.contextmanager
def batch_sharded(sharding):
    """Constrain activations to `sharding` (a NamedSharding of the batch axis) inside."""
    token = _BATCH.set(sharding)
    try:
        yield
    finally:
        _BATCH.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
    """x `[batch, ...]` laid out by the active `batch_sharded` sharding on its leading axis; the
    identity without one, or when the batch does not divide over the axes."""
    sharding = _BATCH.get()
    if sharding is None:
        return x
    (axes, *_) = tuple(sharding.spec) or (None,)
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if x.shape[0] % math.prod(sharding.mesh.shape[a] for a in names):
        return x
    return jax.lax.with_sharding_constraint(x, sharding)
