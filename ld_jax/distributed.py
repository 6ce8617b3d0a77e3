"""Multi-process start-up through JAX's own distributed runtime.

Every `ld-jax` entry point calls `initialize_from_env()` before touching devices. With no
variables set it does nothing (one process). The launchers in `launch/` set:

- `LD_JAX_COORDINATOR=host:port`, `LD_JAX_NUM_PROCESSES`, `LD_JAX_PROCESS_ID`: explicit set-up
  (local multi-process tests, SLURM without auto-detection);
- `LD_JAX_DISTRIBUTED=auto`: let `jax.distributed.initialize()` detect the cluster (TPU pod
  slices, SLURM, Open MPI).

On CPU the cross-process collectives go through gloo.
"""

from __future__ import annotations

import os

import jax

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
