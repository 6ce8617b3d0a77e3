"""Orbax checkpoints of the training state plus a small JSON record of the loop's position.

A checkpoint at step k holds the state after k batches; the data pipeline is random-access by
batch index, so resuming at k reads exactly the batches an uninterrupted run would have read.
Saves are asynchronous (orbax copies the arrays off the devices before `save` returns, so the
next step may donate them); only complete checkpoints are ever listed, so a run killed during a
save resumes from the previous one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ld_jax.errors import LdJaxError


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, reference=None) -> None:
        """reference: parameters of a moving reference model (TR-DPO), saved beside the state."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        self._manager.save(step, args=ocp.args.Composite(**items))

    def restore_reference(self, step: int, like, shardings):
        """The reference parameters saved at `step` (see `save`), laid out as `shardings`."""
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings
        )
        args = ocp.args.Composite(reference=ocp.args.StandardRestore(target))
        try:
            return self._manager.restore(step, args=args).reference
        except Exception as e:
            raise LdJaxError(
                f"the checkpoint at {self.directory} step {step} holds no reference parameters "
                f"(saved without ref_sync_every?): {' '.join(str(e).split())[:300]}"
            ) from e

    def meta(self, step: int) -> dict:
        """The JSON record saved with the checkpoint at `step` (no arrays are read)."""
        try:
            return dict(
                self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
            )
        except Exception as e:  # orbax raises many types for a foreign or damaged checkpoint
            raise LdJaxError(
                f"cannot read the checkpoint record at {self.directory} step {step}: "
                f"{' '.join(str(e).split())[:300]}"
            ) from e

    def restore(self, step: int, state_like, shardings):
        """The state at `step`, laid out as `shardings`, and its JSON record.

        state_like: a pytree of arrays or ShapeDtypeStructs with the state's structure."""
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises many types for a foreign checkpoint
            raise LdJaxError(
                f"cannot resume from {self.directory} step {step} (a different model or "
                f"optimizer?): {' '.join(str(e).split())[:300]}"
            ) from e
        return restored.state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def restore_params(directory: str | Path, step: int | None = None):
    """The parameter pytree (host arrays) of the checkpoint at `step` (default the latest) in
    `directory`, read without knowing the optimizer: for `ld-jax export`."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise LdJaxError(f"no checkpoints directory at {directory}")
    manager = ocp.CheckpointManager(directory)
    try:
        steps = manager.all_steps()
        step = manager.latest_step() if step is None else step
        if step is None or step not in steps:
            raise LdJaxError(
                f"{directory}: no checkpoint at step {step} (saved steps: "
                f"{', '.join(map(str, sorted(steps))) or 'none'})"
            )
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as e:
            raise LdJaxError(
                f"cannot read the checkpoint at {directory} step {step}: "
                f"{' '.join(str(e).split())[:300]}"
            ) from e
    finally:
        manager.close()
    state = restored.state
    # TrainState is a NamedTuple; restored without a target it comes back as a dict or a list
    params = state["params"] if isinstance(state, dict) else state[1]
    return jax.tree.map(np.asarray, params)
