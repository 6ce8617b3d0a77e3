"""Process-local input: each process collates only the rows of a global batch that its own
devices hold, and `to_global` joins the processes' rows into one global jax.Array per key with
`jax.make_array_from_process_local_data`.

    rows = local_rows(mesh, batch_size)                        # e.g. slice(4, 8) on process 1 of 2
    ds = pipeline.make_batches(pairs, batch_size, rows=rows)   # ds[k]: rows `rows` of global batch k
    batch = to_global(ds[k], mesh, batch_size)                 # PairBatch of [B, ...] global arrays

`batch_layout` says how many pairs and rows a batch has. The global batch k is exactly
`make_batches(pairs, batch_size)[k]`: the same grain shuffle,
batching and epochs, and the same padded length (the longest pair of the *global* batch, so every
process builds arrays of one shape). On one process `rows` is the whole batch.
Tokenized pairs are a few integers per token, so every process keeps all of them; only the padded
arrays, the part that grows with batch x sequence length, are built per process.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ld_jax.errors import LdJaxError
from ld_jax.train.sharding import BATCH, batch_divisor


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How an update's pairs fill the step's arrays.

    Every optimizer update takes `pairs` pairs (the configured batch, or all pairs when there
    are fewer). The step's arrays have `rows` rows: `pairs` rounded up to a multiple of
    `devices × micro_batches`, the extra rows padding with valid = 0. Padding weighs nothing in
    the loss, so the rounding changes neither the number of updates nor any update; it only
    costs compute. Evaluation passes (reference and final log-probs) run `eval_rows` rows at a
    time, one micro-batch's worth, so they fit wherever a step does."""

    pairs: int
    rows: int
    micro_batches: int
    devices: int  # data-parallel size: mesh "data" x "fsdp"
    requested: int  # the configured batch_size

    @property
    def padding(self) -> int:
        return self.rows - self.pairs

    @property
    def eval_rows(self) -> int:
        return self.rows // self.micro_batches

    def describe(self) -> str:
        text = f"{self.pairs} pairs per update"
        if self.pairs < self.requested:
            text += f" (batch_size {self.requested}, but the data has only {self.pairs})"
        if self.micro_batches > 1:
            text += f" in {self.micro_batches} micro-batches of {self.eval_rows} rows"
        if self.padding:
            text += (
                f", padded with {self.padding} empty rows to {self.rows} (a multiple of "
                f"{self.devices} data-parallel devices x {self.micro_batches} micro-batches; "
                f"they weigh nothing and cost compute)"
            )
        return text


def batch_layout(
    batch_size: int, num_pairs: int, mesh: Mesh, micro_batches: int = 1, strict: bool = False
) -> BatchLayout:
    """The BatchLayout of `batch_size` pairs per update on `mesh` (see BatchLayout).

    strict: an error instead of padding when batch_size is not a multiple of devices x
    micro-batches (the user asked for no wasted rows)."""
    if batch_size < 1 or micro_batches < 1:
        raise LdJaxError(
            f"batch_size and grad_accum_steps must be >= 1, got {batch_size}, {micro_batches}"
        )
    devices = batch_divisor(mesh)
    pairs = min(batch_size, num_pairs)
    multiple = devices * micro_batches
    rows = -(-pairs // multiple) * multiple
    if strict and batch_size % multiple:
        raise LdJaxError(
            f"batch_size {batch_size} is not a multiple of {devices} data-parallel devices x "
            f"{micro_batches} micro-batches = {multiple} (strict_batch)"
        )
    return BatchLayout(pairs, rows, micro_batches, devices, batch_size)


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
        raise LdJaxError(
            f"process {jax.process_index()} holds non-contiguous batch rows {sorted(starts)}"
        )
    return slice(lo, hi)


def to_global(local, mesh: Mesh, batch_size: int):
    """This process's rows (a PairBatch, or any pytree, of `[n_local, ...]` arrays) -> the same
    pytree of global `[batch_size, ...]` jax.Arrays split over ("data", "fsdp"); every process
    calls it with its own rows."""
    sharding = NamedSharding(mesh, BATCH)
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (batch_size, *np.shape(v)[1:])
        ),
        local,
    )
