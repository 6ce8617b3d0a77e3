"""CHES (Definition 2), length-normalised CHES (Definition 3) and the two Section 5 baselines:
the last-hidden inner product and the normalised token edit distance (SPEC §4).

    scores = ches_scores(lm, prompt_ids, chosen_ids, rejected_ids)   # dict of [n] arrays

The kernel runs prompt+y+ and prompt+y− as one `[2·batch, seq]` forward pass of the model's
final hidden states (no vocabulary matmul), reduces them to per-pair scalars in float32 on the
device, and returns only those scalars: the `[batch, seq, d_model]` states never leave it.

Positions (SPEC §4): with prompt length P and response length R (the ids include EOS when the
caller wants it), CHES sums the states at positions P−1 .. P+R−2, the ones that predict
response tokens 1..R. In a padded row these are exactly the positions whose *next* position
holds a response token, which is how `score_positions` finds them on either padding side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from rapidfuzz.distance import Levenshtein
from tqdm.auto import tqdm

from ld_jax import models
from ld_jax.data.formatting import TokenizedPair
from ld_jax.data.pipeline import make_batches
from ld_jax.errors import LdJaxError
from ld_jax.models.constraints import batch_sharded
from ld_jax.train import feed, sharding

SCORE_KEYS = ("ches", "ln_ches", "last_hidden_ip", "edit_distance")


def score_positions(response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """response_mask [batch, seq] 0/1 (1 on response tokens) -> (summed, last), both
    [batch, seq] bool: the states CHES sums, and the state after the final response token."""
    following = jnp.pad(response_mask[:, 1:], ((0, 0), (0, 1))).astype(bool)
    return following, response_mask.astype(bool) & ~following


def pair_scores(hidden: jax.Array, response_mask: jax.Array) -> dict[str, jax.Array]:
    """Per-pair scores from final hidden states.

    hidden [batch, 2, seq, d_model] (any float dtype; axis 1 is chosen, rejected),
    response_mask [batch, 2, seq] -> dict of [batch] float32: ches, ln_ches, last_hidden_ip,
    len_chosen, len_rejected. Every reduction accumulates in float32, also for bf16 states.
    """
    b, _, s, d = hidden.shape
    summed, last = score_positions(response_mask.reshape(2 * b, s))
    flat = hidden.reshape(2 * b, s, d)

    def pick(mask):  # [2b, s] -> [batch, 2, d] float32
        picked = jnp.einsum(
            "nsd,ns->nd", flat, mask.astype(flat.dtype), preferred_element_type=jnp.float32
        )
        return picked.reshape(b, 2, d)

    sums, last_states = pick(summed), pick(last)
    lengths = summed.sum(-1).reshape(b, 2).astype(jnp.float32)
    means = sums / lengths[..., None]
    # ⟨H+, H−⟩ − ‖H+‖² written as ⟨H+, H− − H+⟩: the difference is formed per coordinate
    # first, so near-identical responses do not cancel two large norms against each other.
    ches = jnp.sum(sums[:, 0] * (sums[:, 1] - sums[:, 0]), axis=-1)
    ln_ches = jnp.sum(means[:, 0] * (means[:, 1] - means[:, 0]), axis=-1)
    last_ip = jnp.sum(last_states[:, 0] * last_states[:, 1], axis=-1)
    return dict(
        ches=ches,
        ln_ches=ln_ches,
        last_hidden_ip=last_ip,
        len_chosen=lengths[:, 0],
        len_rejected=lengths[:, 1],
    )


@functools.partial(jax.jit, static_argnums=0)
def ches_kernel(hidden_fn: Callable, params, input_ids, attention_mask, response_mask):
    """One batch in the layout of `ld_jax.data.pipeline` -> per-pair scores.

    hidden_fn: `lm.hidden_states` (params, ids [n, seq], mask [n, seq]) -> [n, seq, d_model].
    input_ids, attention_mask, response_mask [batch, 2, seq] -> dict of [batch] (pair_scores).
    """
    b, _, s = input_ids.shape
    hidden = hidden_fn(params, input_ids.reshape(2 * b, s), attention_mask.reshape(2 * b, s))
    return pair_scores(hidden.reshape(b, 2, s, -1), response_mask)


def edit_distance(
    chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]]
) -> np.ndarray:
    """Token-level Levenshtein distance (unit costs) / max(|y+|, |y−|), per pair -> [n] float64.

    rapidfuzz runs a bit-parallel C++ algorithm on any hashable sequence, here token ids."""
    return np.array(
        [Levenshtein.normalized_distance(c, r) for c, r in zip(chosen_ids, rejected_ids)],
        np.float64,
    )


def length_batches(lm, pairs: Sequence[TokenizedPair], batch_size: int, pad_to_multiple: int = 64):
    """Pairs longest first, in padded batches of `ld_jax.data.pipeline`'s layout: neighbours in
    length share a batch, whose length is its longest pair rounded up to `pad_to_multiple`
    (which also bounds the number of shapes the kernel compiles for). -> grain.MapDataset."""
    order = sorted(pairs, key=lambda p: -p.length)
    return make_batches(
        order, batch_size, shuffle=False, pad_id=models.pad_id(lm), pad_to_multiple=pad_to_multiple
    )


def score_batches(
    lm,
    pairs: Sequence[TokenizedPair],
    batch_size: int = 8,
    mesh: Mesh | None = None,
    pad_to_multiple: int = 64,
    progress: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Score `pairs` batch by batch; yields dicts of [k] NumPy arrays: `index` plus SCORE_KEYS,
    len_chosen and len_rejected, for the k real pairs of each batch.

    Pairs run longest first (`length_batches`), so the first batch shows the peak memory. Each
    batch is split over the mesh's "data" axis (batch_size is rounded up to a multiple of its
    size) and the params are replicated. While the device runs one batch, the host collates
    the next and computes edit distances.
    """
    if not pairs:
        return
    mesh = mesh or sharding.make_mesh(devices=jax.local_devices())
    batch_size = feed.batch_layout(batch_size, batch_size, mesh).rows
    batches = length_batches(lm, pairs, batch_size, pad_to_multiple)
    by_index = {p.index: p for p in pairs}
    data = NamedSharding(mesh, sharding.BATCH)
    # the family's partition rules: replicated on the default all-"data" mesh, split on a mesh
    # with "fsdp" (the layout `ld-jax plan --topology` compiles this kernel for)
    shardings = sharding.tree_shardings(lm.params, mesh, sharding.rules_for(lm.config.family))
    params = jax.device_put(lm.params, shardings)

    def launch(k):
        batch = batches[k]
        arrays = (batch.input_ids, batch.attention_mask, batch.response_mask)
        with batch_sharded(data):  # activations split over the batch when traced
            scores = ches_kernel(
                lm.hidden_states, params, *(jax.device_put(a, data) for a in arrays)
            )
        return batch.index[batch.valid > 0], scores

    bar = tqdm(total=len(pairs), unit="pair", desc="ches", disable=not progress)
    pending = launch(0)
    for k in range(len(batches)):
        index, scores = pending
        pending = launch(k + 1) if k + 1 < len(batches) else None  # queued behind batch k
        kept = [by_index[int(i)] for i in index]
        out = {key: np.asarray(v)[: len(index)] for key, v in scores.items()}
        out["edit_distance"] = edit_distance(
            [p.chosen_ids for p in kept], [p.rejected_ids for p in kept]
        )
        out["index"] = index
        bar.update(len(index))
        yield out
    bar.close()


def score_pairs(
    lm,
    pairs: Sequence[TokenizedPair],
    batch_size: int = 8,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Every score of `pairs`, in memory: dict of `[len(pairs)]` arrays in `pairs` order, the
    SCORE_KEYS plus len_chosen and len_rejected (the number of states each sum covers)."""
    keys = (*SCORE_KEYS, "len_chosen", "len_rejected")
    return collect(score_batches(lm, pairs, batch_size, mesh, progress=progress), pairs, keys)


def collect(batches, pairs: Sequence[TokenizedPair], keys) -> dict[str, np.ndarray]:
    """Streamed per-batch dicts (`index` plus `keys`, as `score_batches` yields) -> one
    `[len(pairs)]` float64 array per key, in `pairs` order."""
    position = {p.index: k for k, p in enumerate(pairs)}
    if len(position) != len(pairs):
        raise LdJaxError("the pairs' indices must be distinct")
    result = {key: np.zeros(len(pairs), np.float64) for key in keys}
    for out in batches:
        rows = [position[int(i)] for i in out["index"]]
        for key in keys:
            result[key][rows] = out[key]
    return result


def pairs_from_ids(prompt_ids, chosen_ids, rejected_ids, caller: str) -> list[TokenizedPair]:
    """n formatted token-id lists of each part -> n TokenizedPairs indexed 0..n−1; a length
    mismatch or an empty part is a one-line error naming `caller`."""
    n = len(prompt_ids)
    if not (len(chosen_ids) == len(rejected_ids) == n):
        raise LdJaxError(
            f"{caller}: got {n} prompts, {len(chosen_ids)} chosen and {len(rejected_ids)} rejected"
        )
    for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        if not (len(p) and len(c) and len(r)):
            raise LdJaxError(f"{caller}: pair {i} has an empty prompt or response")
    return [
        TokenizedPair(i, list(p), list(c), list(r))
        for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids))
    ]


def ches_scores(
    lm,
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """CHES, length-normalised CHES, last-hidden inner product and edit distance of n pairs.

    Each `*_ids` is a list of n token-id lists, already formatted; the response lists include
    EOS when the caller wants it (nothing is added). -> dict of [n] float arrays, SCORE_KEYS.
    """
    pairs = pairs_from_ids(prompt_ids, chosen_ids, rejected_ids, "ches_scores")
    scores = score_pairs(lm, pairs, batch_size, mesh, progress)
    return {key: scores[key] for key in SCORE_KEYS}
