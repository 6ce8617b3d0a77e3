"""CHES (Definition 2), length-normalised CHES (Definition 3) and the two Section 5 baselines:
the last-hidden inner product and the normalised token edit distance (SPEC §4).

    scores = ches_scores(lm, prompt_ids, chosen_ids, rejected_ids)   # dict of [n] arrays

The kernel runs prompt+y+ and prompt+y− as one `[2·batch, seq]` forward pass of the model's
final hidden states (no vocabulary matmul), reduces them to per-pair scalars in float32 on the
device, and returns only those scalars: the `[batch, seq, d_model]` states never leave it.

Positions (SPEC §4): with prompt length P and response length R (the ids include EOS when the
caller wants it), CHES sums the states at positions P−1 .. P+R−2, the ones that predict
response tokens 1..R: exactly the PairBatch's `predict_from` states of that response, on
either padding side and in either layout (in the packed row the prompt's last state predicts
the first token of both responses).
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
from ld_jax.data.batch import CHOSEN, DEFAULT_LAYOUT, REJECTED
from ld_jax.data.formatting import TokenizedPair
from ld_jax.data.pipeline import make_batches, row_length
from ld_jax.errors import LdJaxError
from ld_jax.logprobs import segment_weights
from ld_jax.models.constraints import batch_sharded
from ld_jax.models.core import TokenLayout
from ld_jax.train import feed, sharding

SCORE_KEYS = ("ches", "ln_ches", "last_hidden_ip", "edit_distance")


def last_positions(segments: jax.Array) -> jax.Array:
    """segments [n, S] -> float32 [n, S, 2]: 1 at the last token of y+ and of y− (the state
    after the final response token), in either layout."""
    following = jnp.pad(segments[:, 1:], ((0, 0), (0, 1)))
    return jnp.stack([(segments == g) & (following != g) for g in (CHOSEN, REJECTED)], -1).astype(
        jnp.float32
    )


def pair_scores(hidden, batch) -> dict[str, jax.Array]:
    """Per-pair scores from final hidden states, in either layout of `data.batch`.

    hidden [B, R, S, d_model] (any float dtype), the states of the PairBatch `batch`'s rows
    -> dict of [B] float32: ches, ln_ches, last_hidden_ip, len_chosen, len_rejected. The sums
    run over the states at `batch.predict_from` (those that predict a response token). Every
    reduction accumulates in float32, also for bf16 states."""
    b, r, s, d = hidden.shape
    hidden = hidden.reshape(b * r, s, d)
    t = batch.predict_from.shape[-1]
    predicting = jnp.take_along_axis(hidden, batch.predict_from.reshape(b * r, t, 1), axis=1)
    weights = segment_weights(batch.target_segments.reshape(b * r, t))  # [n, T, 2]
    last = last_positions(batch.segments.reshape(b * r, s))  # [n, S, 2]

    def pick(states, mask):  # [n, L, d] x [n, L, 2] -> [B, 2, d] float32, summed over rows
        picked = jnp.einsum(
            "nld,nlj->njd", states, mask.astype(states.dtype), preferred_element_type=jnp.float32
        )
        return picked.reshape(b, -1, 2, picked.shape[-1]).sum(1)

    sums, last_states = pick(predicting, weights), pick(hidden, last)
    lengths = weights.sum(1).reshape(b, -1, 2).sum(1)
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
def ches_kernel(hidden_fn: Callable, params, batch):
    """One PairBatch (`batch.sequences()`, either layout) -> per-pair scores (pair_scores).

    hidden_fn: `lm.hidden_states` (params, ids [n, S], layout=TokenLayout) -> [n, S, d_model].
    In the shared_prefix layout the states of y+ and y− come from one forward of the packed
    row, the prompt computed once."""

    def flat(x):
        return x.reshape(-1, x.shape[-1])

    layout = TokenLayout(flat(batch.positions), flat(batch.segments))
    hidden = hidden_fn(params, flat(batch.input_ids), layout=layout)
    return pair_scores(hidden.reshape(*batch.input_ids.shape, -1), batch)


def edit_distance(
    chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]]
) -> np.ndarray:
    """Token-level Levenshtein distance (unit costs) / max(|y+|, |y−|), per pair -> [n] float64.

    rapidfuzz runs a bit-parallel C++ algorithm on any hashable sequence, here token ids."""
    return np.array(
        [Levenshtein.normalized_distance(c, r) for c, r in zip(chosen_ids, rejected_ids)],
        np.float64,
    )


def length_batches(
    lm,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_to_multiple: int = 64,
    layout: str = DEFAULT_LAYOUT,
):
    """Pairs longest first, in padded PairBatches of `layout`: neighbours in length share a
    batch, whose length is its longest row rounded up to `pad_to_multiple` (which also bounds
    the number of shapes the kernel compiles for). -> grain.MapDataset."""
    order = sorted(pairs, key=lambda p: -row_length(p, layout))
    return make_batches(
        order,
        batch_size,
        shuffle=False,
        pad_id=models.pad_id(lm),
        pad_to_multiple=pad_to_multiple,
        layout=layout,
    )


def score_batches(
    lm,
    pairs: Sequence[TokenizedPair],
    batch_size: int = 8,
    mesh: Mesh | None = None,
    pad_to_multiple: int = 64,
    progress: bool = True,
    layout: str = DEFAULT_LAYOUT,
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
    batches = length_batches(lm, pairs, batch_size, pad_to_multiple, layout)
    by_index = {p.index: p for p in pairs}
    data = NamedSharding(mesh, sharding.BATCH)
    # the family's partition rules: replicated on the default all-"data" mesh, split on a mesh
    # with "fsdp" (the layout `ld-jax plan --topology` compiles this kernel for)
    shardings = sharding.tree_shardings(lm.params, mesh, sharding.rules_for(lm.config.family))
    params = jax.device_put(lm.params, shardings)

    def launch(k):
        batch = batches[k]
        with batch_sharded(data):  # activations split over the batch when traced
            scores = ches_kernel(lm.hidden_states, params, jax.device_put(batch.sequences(), data))
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
    layout: str = DEFAULT_LAYOUT,
) -> dict[str, np.ndarray]:
    """Every score of `pairs`, in memory: dict of `[len(pairs)]` arrays in `pairs` order, the
    SCORE_KEYS plus len_chosen and len_rejected (the number of states each sum covers)."""
    keys = (*SCORE_KEYS, "len_chosen", "len_rejected")
    batches = score_batches(lm, pairs, batch_size, mesh, progress=progress, layout=layout)
    return collect(batches, pairs, keys)


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
