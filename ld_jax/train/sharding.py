"""Device mesh with axes ("data", "fsdp", "tensor") and the mechanism that applies a model
family's partition rules (the rules themselves are data in each family's registry entry,
`ld_jax.models.family.MATRIX_RULES` for most).

Rules are (regex, PartitionSpec) pairs, searched in order against a leaf's path ("layers/wq",
or "1/0/nu/layers/wq" inside an optimizer state), first match wins. A mesh axis that does not
divide a dimension is dropped for that leaf, so the same rules serve any model size.

Batches are split over ("data", "fsdp") on their leading pair axis.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ld_jax.errors import LdJaxError

AXES = ("data", "fsdp", "tensor")
BATCH = P(("data", "fsdp"))

Rules = tuple[tuple[str, P], ...]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 for "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise LdJaxError(f"mesh sizes must be positive, with at most one -1; got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise LdJaxError(f"mesh {sizes} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise LdJaxError(
            f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    return Mesh(np.array(devices).reshape(sizes), AXES, axis_types=(AxisType.Auto,) * 3)


def batch_divisor(mesh: Mesh) -> int:
    """The global batch (in pairs) must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop the mesh axes of `spec` that have size 1 or do not divide their dimension."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if mesh.shape[a] > 1 and dim % mesh.shape[a] == 0)
        if not kept or dim % math.prod(mesh.shape[a] for a in kept):
            fitted.append(None)
        else:
            fitted.append(kept[0] if len(kept) == 1 else kept)
    return P(*fitted)


def tree_shardings(tree, mesh: Mesh, rules: Rules):
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by its path."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def one(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        spec = next((s for pattern, s in compiled if pattern.search(name)), P())
        return NamedSharding(mesh, fit_spec(spec, np.shape(leaf), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def offload_optimizer_state(state_shardings):
    """The same shardings with every optimizer-state leaf in pinned host memory: the step
    (`train.step.compile_step`) brings it to the device only for the update."""
    host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), state_shardings.opt_state)
    return state_shardings._replace(opt_state=host)


def batch_shardings(batch, mesh: Mesh):
    return jax.tree.map(lambda _: NamedSharding(mesh, BATCH), batch)


def rules_for(family: str) -> Rules:
    """The partition rules of a model family (its registry entry, `ld_jax.models.registry`)."""
    from ld_jax.models.registry import family as entry

    return entry(family).partition_rules


def put(tree, shardings):
    """Host arrays (the same full value on every process) -> global jax.Arrays."""

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)
