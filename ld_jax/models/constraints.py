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

An untied LM head is split over the vocabulary on ("fsdp", "tensor") (Megatron's vocab-parallel
head). `constrain_head_input` all-gathers a chunk of hidden states over those axes and
`constrain_vocab` splits the chunk's `[batch, n, vocab]` logits over them, so each device makes
its vocabulary slice of the logits and of the head's gradient; the log-softmax reduces across
devices. Left to the compiler, the same rule compiled to a higher peak (docs/scaling.md).

Outside `batch_sharded` (eager calls, the CHES kernel, tests) `constrain_batch` is the identity,
so the models stay pure functions with no mesh of their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_BATCH = contextvars.ContextVar("batch_sharding", default=None)


@contextlib.contextmanager
def batch_sharded(sharding):
    """Constrain activations to `sharding` (a NamedSharding of the batch axis) inside."""
    token = _BATCH.set(sharding)
    try:
        yield
    finally:
        _BATCH.reset(token)


VOCAB_AXES = ("fsdp", "tensor")  # the untied head's vocabulary split (models/core.MATRIX_RULES)


def _active(x: jax.Array, spec: P) -> jax.Array:
    sharding = _BATCH.get()
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def vocab_split(vocab_size: int) -> bool:
    """Whether, under the active `batch_sharded`, an untied head of `vocab_size` rows is split
    over VOCAB_AXES (the rules drop an axis that does not divide the vocabulary)."""
    sharding = _BATCH.get()
    if sharding is None:
        return False
    n = math.prod(sharding.mesh.shape.get(a, 1) for a in VOCAB_AXES)
    return n > 1 and vocab_size % n == 0


def _batch_axes_without_vocab(batch: int):
    """The active batch axes other than VOCAB_AXES, or None if they do not divide `batch`."""
    sharding = _BATCH.get()
    (axes, *_) = tuple(sharding.spec) or (None,)
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in names if a not in VOCAB_AXES)
    if not kept or batch % math.prod(sharding.mesh.shape[a] for a in kept):
        return None
    return kept


def constrain_head_input(x: jax.Array) -> jax.Array:
    """x `[batch, n, d_model]` gathered over VOCAB_AXES (still split over the other batch
    axes), for a vocabulary-split head; call only where `vocab_split` holds."""
    axes = _batch_axes_without_vocab(x.shape[0])
    return _active(x, P(axes, *([None] * (x.ndim - 1))))


def constrain_vocab(x: jax.Array) -> jax.Array:
    """logits `[batch, n, vocab]` split over VOCAB_AXES on the vocabulary; call only where
    `vocab_split` holds."""
    axes = _batch_axes_without_vocab(x.shape[0])
    return _active(x, P(axes, *([None] * (x.ndim - 2)), VOCAB_AXES))


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
