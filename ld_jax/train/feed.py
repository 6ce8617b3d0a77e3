"""Process-local input: each process collates only the rows of a global batch that its own
devices hold, and `to_global` joins the processes' rows into one global jax.Array per key with
`jax.make_array_from_process_local_data`.

    rows = local_rows(mesh, batch_size)                        # e.g. slice(4, 8) on process 1 of 2
    ds = pipeline.make_batches(pairs, batch_size, rows=rows)   # ds[k]: rows `rows` of global batch k
    batch = to_global(ds[k], mesh, batch_size)                 # dict of [B, ...] global arrays

The global batch k is exactly `make_batches(pairs, batch_size)[k]`: the same grain shuffle,
batching and epochs, and the same padded length (the longest pair of the *global* batch, so every
process builds arrays of one shape). On one process `rows` is the whole batch.
Tokenized pairs are a few integers per token, so every process keeps all of them; only the padded
arrays, the part that grows with batch x sequence length, are built per process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ld_jax.errors import LdJaxError
from ld_jax.train.sharding import BATCH


def local_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a `[batch_size, ...]` batch split as `BATCH` that this process's devices hold.

    A mesh built from `jax.devices()` (ordered by process) gives each process one contiguous
    block; several processes may hold the same block when "tensor" spans processes."""
    index_map = NamedSharding(mesh, BATCH).addressable_devices_indices_map((batch_size,))
    starts = {idx[0].start or 0 for idx in index_map.values()}
    stops = {batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()}
    lo, hi = min(starts), max(stops)
    step = (hi - lo) // max(len(starts), 1)
    if sorted(starts) != list(range(lo, hi, step)):
        raise LdJaxError(f"process {jax.process_index()} holds non-contiguous batch rows {sorted(starts)}")
    return slice(lo, hi)


def to_global(local: dict, mesh: Mesh, batch_size: int) -> dict:
    """This process's rows (dict of `[n_local, ...]` arrays) -> dict of global `[batch_size, ...]`
    jax.Arrays split over ("data", "fsdp"); every process calls it with its own rows."""
    sharding = NamedSharding(mesh, BATCH)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (batch_size, *np.shape(v)[1:]))
        for k, v in local.items()
    }
