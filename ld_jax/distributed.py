"""Multi-process start-up through JAX's own distributed runtime.

Every `ld-jax` entry point calls `initialize_from_env()` before touching devices. With no
variables set it does nothing (one process). The launchers in `launch/` set:

- `LD_JAX_COORDINATOR=host:port`, `LD_JAX_NUM_PROCESSES`, `LD_JAX_PROCESS_ID`: explicit set-up
  (local multi-process tests, SLURM without auto-detection);
- `LD_JAX_DISTRIBUTED=auto`: let `jax.distributed.initialize()` detect the cluster (TPU pod
  slices, SLURM, Open MPI).

On CPU the cross-process collectives go through gloo.

The helpers below are no-ops on one process, so callers need no branches:
`broadcast_from_main` (process 0's host value to all, e.g. a cached file only it can read),
`process_share` (this process's part of a list), `gather_rows` (JSON-able rows from every
process to all) and `to_host` (full NumPy values of
global arrays that span processes).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

_initialized = False


def initialize_from_env(env: dict[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize` as the environment asks; True if it did."""
    global _initialized
    env = dict(os.environ if env is None else env)
    if _initialized:
        return True
    coordinator = env.get("LD_JAX_COORDINATOR")
    mode = env.get("LD_JAX_DISTRIBUTED", "")
    if not coordinator and mode != "auto":
        return False
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(env["LD_JAX_NUM_PROCESSES"]),
            process_id=int(env["LD_JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    _initialized = True
    return True


def is_main_process() -> bool:
    """Only process 0 writes result files and shows progress bars."""
    return jax.process_index() == 0


def broadcast_from_main(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process; the others pass any array of the same shape and
    dtype. Bit-exact (float32, int32, bool, uint8)."""
    if jax.process_count() == 1:
        return np.asarray(value)
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every process's `rows` (JSON-able dicts), concatenated in process order, on every process.

    Sent as UTF-8 JSON bytes padded to the longest process's length, so floats arrive exactly."""
    if jax.process_count() == 1:
        return list(rows)
    data = np.frombuffer(json.dumps(rows).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [
        row
        for blob, n in zip(gathered, sizes.reshape(-1))
        for row in json.loads(blob[:n].tobytes())
    ]


def process_share(items: list, key=None) -> list:
    """This process's share of `items`: every `process_count()`-th one after sorting by `key`
    (descending, e.g. length, so that every process gets a similar mix). All on one process."""
    if jax.process_count() == 1:
        return list(items)
    ordered = sorted(items, key=key, reverse=True) if key is not None else list(items)
    return ordered[jax.process_index() :: jax.process_count()]


def to_host(tree):
    """Full NumPy values of a pytree of jax.Arrays, also of arrays sharded across processes
    (gathered; every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
