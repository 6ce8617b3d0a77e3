"""Log-probs of a whole dataset under fixed weights: the reference pass (cached) and the final
evaluation of a training run.

    ref = reference_logps(lm, pairs)                      # [len(pairs), 2], ln π(y±|x)
    ref = reference_logps(lm, pairs, mesh, cache_dir=run) # computed once, then read back

Pairs run in their input order, `rows` at a time, split over the mesh's ("data", "fsdp") axes;
the result is replicated on every process. The cache key holds everything that can change a
single bit of the values: the model's result fields, the parameter dtype, the batch rows and
padding, the LM-head chunking, the exact token ids and the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ld_jax import distributed, files, models
from ld_jax.data import pipeline
from ld_jax.data.batch import DEFAULT_LAYOUT
from ld_jax.digest import fingerprint, pairs_digest, params_digest
from ld_jax.models.config import result_fields
from ld_jax.train import feed, sharding
from ld_jax.train.step import compile_logprobs

_JITTED: dict = {}  # compiled functions of earlier calls in this process (e.g. E2's many subsets)


def reuse(key, build):
    """`build()` once per `key` in this process; the jitted functions see only the model's config
    (never its weights), so runs on the same model share their compilations."""
    if key not in _JITTED:
        if len(_JITTED) >= 16:
            _JITTED.clear()
        _JITTED[key] = build()
    return _JITTED[key]


@dataclasses.dataclass(frozen=True)
class Padding:
    """How sequences are padded and laid out: part of every log-prob cache key."""

    pad_id: int = 0
    pad_to_multiple: int = 64
    padding_side: str = "right"
    layout: str = DEFAULT_LAYOUT  # paired | shared_prefix (ld_jax.data.batch)


def logprobs_function(model, mesh, param_shardings, seq_chunk: int | None = None):
    """The jitted (params, PairBatch.sequences()) -> ln π(y±|x) [B, 2] for `model`'s config."""
    bare = dataclasses.replace(model, params=None, tokenizer=None)
    return reuse(
        ("logprobs", model.config, mesh, seq_chunk),
        lambda: compile_logprobs(bare, mesh, param_shardings, seq_chunk),
    )


def dataset_logps(
    model,
    params,
    pairs,
    mesh,
    rows: int,
    *,
    padding: Padding,
    seq_chunk=None,
    progress: bool = False,
    desc: str = "log-probs",
) -> np.ndarray:
    """ln π(y±|x) `[len(pairs), 2]` float32 under `params` (global arrays laid out by the
    partition rules on `mesh`), in `pairs` order; `rows` (a multiple of the data-parallel
    size) pairs per batch."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    fn = logprobs_function(model, mesh, shardings, seq_chunk)
    mine = feed.local_rows(mesh, rows)
    ds = pipeline.make_batches(pairs, rows, shuffle=False, rows=mine, **dataclasses.asdict(padding))
    out = []
    for k in tqdm(range(len(ds)), desc=desc, disable=not progress, leave=False):
        seqs = feed.to_global(ds[k].sequences(), mesh, rows)
        out.append(np.asarray(fn(params, seqs)))  # replicated
    return np.concatenate(out)[: len(pairs)]  # the padding rows are the last of the last batch


def reference_logps(
    model,
    pairs,
    mesh=None,
    *,
    rows: int = 8,
    params=None,
    param_dtype: str = "float32",
    seq_chunk=None,
    padding: Padding | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """ln π_ref(y±|x) `[len(pairs), 2]` under `model`'s weights (cast to `param_dtype`).

    mesh: default all devices on the "data" axis. params: the weights already sharded on `mesh`
    (the training loop passes its own); default `model.params`, sharded by the family's rules.
    rows is rounded up to the data-parallel size. cache_dir: read the values from, or write
    them to, `cache_dir/ref_logps-<key>.npz` (key in the module docstring)."""
    mesh = mesh or sharding.make_mesh()
    rows = feed.batch_layout(rows, rows, mesh).rows
    padding = padding or Padding(pad_id=models.pad_id(model))
    if params is None:
        rules = sharding.rules_for(model.config.family)
        params = sharding.put(model.params, sharding.tree_shardings(model.params, mesh, rules))
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)

    def compute():
        return dataset_logps(
            model,
            params,
            pairs,
            mesh,
            rows,
            padding=padding,
            seq_chunk=seq_chunk,
            progress=progress,
            desc="reference log-probs",
        )

    if cache_dir is None:
        return compute()
    key = fingerprint(
        result_fields(model.config),
        param_dtype,
        rows,
        seq_chunk,
        dataclasses.asdict(padding),
        pairs_digest(pairs),
        params_digest(model.params),
    )
    return files.cached(
        Path(cache_dir) / f"ref_logps-{key}.npz",
        compute,
        load=lambda p: files.load_npz(p)["logps"].astype(np.float32),
        save=lambda p, v: files.save_npz(p, logps=v),
        main=distributed.is_main_process(),
        broadcast=distributed.broadcast_from_main,
        like=np.zeros((len(pairs), 2), np.float32),
    )


def like_training(cfg, model, pairs, cache_dir, progress: bool = True) -> np.ndarray:
    """ln π(y±|x) `[len(pairs), 2]` of `model`'s own weights, batched, padded and cached exactly
    as `train.loop.train(cfg, ...)` computes its cached reference pass (`cfg`: a
    loop.TrainConfig), so that experiments can share one pass between many runs."""
    mesh = sharding.make_mesh(cfg.mesh)
    layout = feed.batch_layout(cfg.batch_size, len(pairs), mesh, cfg.optimizer.grad_accum_steps)
    model = model.with_options(dtype=cfg.compute_dtype, remat=cfg.remat)
    padding = Padding(
        models.pad_id(model), cfg.data.pad_to_multiple, cfg.data.padding_side, cfg.data.layout
    )
    return reference_logps(
        model,
        pairs,
        mesh,
        rows=layout.eval_rows,
        seq_chunk=cfg.seq_chunk,
        padding=padding,
        cache_dir=cache_dir,
        progress=progress,
    )


@jax.jit
def sync_reference(ref_params, params, alpha):
    """TR-DPO's soft reference update (Gorbatovski et al. 2024, arXiv 2404.09656):
    π_ref ← α·π_θ + (1 − α)·π_ref, leaf by leaf, in the reference's dtype."""
    return jax.tree.map(
        lambda r, p: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(
            r.dtype
        ),
        ref_params,
        params,
    )
