"""The exact first-order displacement of ln π(y+|x) on the real network (Proposition 1, SPEC §3).

With g± = ∇θ ln π(y±|x) over every trainable parameter, a gradient step on one pair's margin
loss ℓ moves ln π(y+|x) at the rate −ℓ′·⟨g+, g+ − g−⟩ per unit learning rate. Since ℓ′ < 0
for DPO, IPO and their relatives, the pair displaces its preferred response at first order iff
⟨g+, g+ − g−⟩ < 0, whatever ℓ is. CHES (`ld_jax.ches`) approximates this quantity from hidden
states; here it is computed exactly.

    rates = first_order_rates(lm, prompt_ids, chosen_ids, rejected_ids)  # dict of [n] arrays
    change = dataset_rates(lm, pairs)          # every pair's ln π(y+) change under ∇ of the
                                               # whole dataset's loss, per unit lr  [n]

ln π is the sum of the response tokens' log-probs at the positions `logprobs.pair_logprobs`
uses (the ids include EOS when the caller wants it; nothing is added). Gradients are float32.

Pair mode differentiates each pair's two log-probs with one reverse-mode Jacobian (one forward,
two backward passes sharing it) and reduces the two gradients to their 2×2 Gram matrix on the
device; only `vectorize` pairs' gradients are live at a time. Dataset mode needs no per-pair
gradient at all: one backward pass for ∇L over all pairs, then one forward-mode JVP of every
ln π(y+_i) along −∇L (Theorem 8's cross-sample effect, on the real network).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from ld_jax import ches, logprobs
from ld_jax.data.batch import CHOSEN, REJECTED
from ld_jax.data.formatting import TokenizedPair
from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig, preference_loss
from ld_jax.models.core import TokenLayout
from ld_jax.train import feed, sharding
from ld_jax.train.optim import OptimizerConfig, make_optimizer

RATE_KEYS = ("pos_sq", "cross", "neg_sq", "rate")
# Pair mode's default layout: per-row gradients do fewer FLOPs than the packed row's two
# backward passes over the whole row unless prompts are long (benchmarks/rate_throughput.py)
RATE_LAYOUT = "paired"


def pair_gram(model, params, batch, vectorize: int = 1):
    """A PairBatch's sequences (`batch.sequences()`, either layout) -> `[B, 2, 2]` float32 Gram
    matrices ⟨g_a, g_b⟩ of g± = ∇θ ln π(y±|x), a, b ∈ (chosen, rejected). `vectorize` pairs
    are differentiated together (more memory: 2·vectorize parameter-sized gradients live; B
    must be a multiple of it).

    Packed rows (shared_prefix): one reverse-mode Jacobian of the row's two log-probs (one
    forward, two backward passes over the whole row). Paired rows: g+ from row 0 alone and g−
    from row 1 alone (a forward and a backward pass each over its own row, what per-sample
    autograd does), so no backward pass runs over the other response's positions."""

    def logps(p, one):  # one pair's fields [R, ...] -> [2]
        single = jax.tree.map(lambda x: x[None], one)
        return logprobs.pair_logprobs(model, p, single)[0][0]

    def row(one, r):  # the pair restricted to its row r (a paired PairBatch's fields [2, ...])
        return jax.tree.map(lambda x: x[r : r + 1], one)

    def grads(one):  # -> pytree with leaves [2, *leaf]
        if one.input_ids.shape[0] == 1:
            return jax.jacrev(logps)(params, one)
        gp = jax.grad(lambda p: logps(p, row(one, 0))[0])(params)
        gm = jax.grad(lambda p: logps(p, row(one, 1))[1])(params)
        return jax.tree.map(lambda a, b: jnp.stack([a, b]), gp, gm)

    def gram(one):
        return sum(leaf_gram(g) for g in jax.tree.leaves(grads(one)))

    return jax.lax.map(gram, batch, batch_size=vectorize if vectorize > 1 else None)


def leaf_gram(g, chunk: int = 4096):
    """g `[2, *leaf]` -> its `[2, 2]` float32 Gram, summed in two levels (`chunk` entries, then
    the chunks): one float32 sum over a 28M-entry embedding drifts by ~2e-4 relative, the
    two-level sum by ~(√chunk + √chunks)·eps."""
    g = g.astype(jnp.float32).reshape(2, -1)
    g = jnp.pad(g, ((0, 0), (0, -g.shape[1] % chunk))).reshape(2, -1, chunk)
    return jnp.einsum("akc,bkc->kab", g, g).sum(0)


def rates_from_gram(gram: np.ndarray) -> dict[str, np.ndarray]:
    """`[n, 2, 2]` Gram matrices -> RATE_KEYS, each `[n]` float64."""
    g = np.asarray(gram, np.float64)
    out = {"pos_sq": g[:, 0, 0], "cross": g[:, 0, 1], "neg_sq": g[:, 1, 1]}
    out["rate"] = out["pos_sq"] - out["cross"]
    return out


def _batches(lm, pairs, batch_size: int, pad_to_multiple: int):
    """(pairs' positions in `pairs`, batch arrays) per padded batch, longest pairs first."""
    position = {p.index: k for k, p in enumerate(pairs)}
    if len(position) != len(pairs):
        raise LdJaxError("the pairs' indices must be distinct")
    for batch in ches.length_batches(lm, pairs, batch_size, pad_to_multiple):
        real = batch.valid > 0
        rows = [position[int(i)] for i in batch.index[real]]
        yield rows, jax.tree.map(jnp.asarray, batch.sequences())


def gram_kernel(lm, mesh: Mesh, vectorize: int = 1):
    """jit of `pair_gram` data-parallel over `mesh`: each device differentiates its share of
    the batch's pairs (split over the batch axes) with a replicated copy of the params; no
    collective runs, each device's Grams stay its own. (params, sequences) -> `[B, 2, 2]`.
    One jitted function per (model config, mesh, vectorize), so that later calls reuse its
    compiled shapes (the kernel reads the model only through its config's functions)."""
    key = (lm.config, mesh, vectorize)
    if key not in _KERNELS:
        _KERNELS[key] = _gram_kernel(lm, mesh, vectorize)
    return _KERNELS[key]


_KERNELS: dict = {}


def _gram_kernel(lm, mesh: Mesh, vectorize: int):
    spec = sharding.BATCH

    def local(params, batch):
        # params enter replicated; marking them varying over the batch axes keeps each
        # device's gradient its own (the transpose of a replicated input would psum them)
        params = jax.lax.pcast(params, tuple(spec[0]), to="varying")
        return pair_gram(lm, params, batch, vectorize=vectorize)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=spec)
    return jax.jit(mapped)


def rate_batches(
    lm,
    pairs: Sequence[TokenizedPair],
    batch_size: int = 4,
    vectorize: int = 1,
    pad_to_multiple: int = 32,
    progress: bool = False,
    mesh: Mesh | None = None,
    layout: str = RATE_LAYOUT,
):
    """Rates batch by batch, longest pairs first; yields dicts of `[k]` NumPy arrays: `index`,
    RATE_KEYS, len_chosen and len_rejected for the k real pairs of each batch (the shape
    `scoring.score_file` streams). Data-parallel over `mesh` (default: every local device on
    the batch axes), as `ches.score_batches`: batch_size is rounded up to a multiple of the
    devices × vectorize, and the params are replicated."""
    if batch_size % vectorize:
        raise LdJaxError(f"batch_size {batch_size} is not a multiple of vectorize {vectorize}")
    if not pairs:
        return
    mesh = mesh or sharding.make_mesh(devices=jax.local_devices())
    devices = sharding.batch_divisor(mesh)
    rows = feed.batch_layout(batch_size, batch_size, mesh).rows
    rows = -(-rows // (devices * vectorize)) * devices * vectorize
    kernel = gram_kernel(lm, mesh, vectorize)
    data = NamedSharding(mesh, sharding.BATCH)
    params = jax.device_put(lm.params, NamedSharding(mesh, P()))
    bar = tqdm(total=len(pairs), unit="pair", desc="rates", disable=not progress)
    for batch in ches.length_batches(lm, pairs, rows, pad_to_multiple, layout):
        real = batch.valid > 0
        out = rates_from_gram(
            np.asarray(kernel(params, jax.device_put(batch.sequences(), data)))[real]
        )
        lengths = [(batch.target_segments[real] == s).sum((1, 2)) for s in (CHOSEN, REJECTED)]
        out.update(index=batch.index[real], len_chosen=lengths[0], len_rejected=lengths[1])
        bar.update(int(real.sum()))
        yield out
    bar.close()


def pair_rates(
    lm,
    pairs: Sequence[TokenizedPair],
    batch_size=4,
    vectorize=1,
    progress=False,
    mesh: Mesh | None = None,
    layout: str = RATE_LAYOUT,
):
    """RATE_KEYS of every pair, in `pairs` order: dict of `[len(pairs)]` float64 arrays."""
    batches = rate_batches(
        lm, pairs, batch_size, vectorize, progress=progress, mesh=mesh, layout=layout
    )
    return ches.collect(batches, pairs, RATE_KEYS)


def first_order_rates(lm, prompt_ids, chosen_ids, rejected_ids, **kw) -> dict[str, np.ndarray]:
    """⟨g+, g+⟩, ⟨g+, g−⟩, ⟨g−, g−⟩ and the rate ⟨g+, g+ − g−⟩ of n pairs, taking what
    `ches.ches_scores` takes (n formatted token-id lists each) -> dict of `[n]` float64 arrays;
    `kw` as `pair_rates` (batch_size, vectorize, progress)."""
    pairs = ches.pairs_from_ids(prompt_ids, chosen_ids, rejected_ids, "first_order_rates")
    return pair_rates(lm, pairs, **kw)


def dataset_gradient(lm, pairs, loss: LossConfig, batch_size: int = 8, pad_to_multiple: int = 32):
    """∇θ of the mean loss over all `pairs` at θ = the model's weights, with the reference
    model equal to it (the first step of training), float32, same pytree as the params."""
    if loss.needs_rewards:
        raise LdJaxError(f"loss {loss.name!r} needs rewards; the dataset mode has none")

    def total(params, batch):
        lp, length = logprobs.pair_logprobs(lm, params, batch)  # [B, 2] each
        ref = jax.lax.stop_gradient(lp)
        per_pair, _ = preference_loss(
            loss, lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], length[:, 0], length[:, 1]
        )
        return jnp.sum(per_pair * (length[:, 0] > 0))  # padding rows have no response

    grad = jax.jit(jax.grad(total))
    acc = jax.tree.map(jnp.zeros_like, lm.params)
    for _, batch in _batches(lm, pairs, batch_size, pad_to_multiple):
        acc = jax.tree.map(jnp.add, acc, grad(lm.params, batch))
    return jax.tree.map(lambda g: g / len(pairs), acc)


def directional_change(
    lm, pairs, direction, batch_size: int = 8, pad_to_multiple: int = 32
) -> np.ndarray:
    """d/dt ln π(y±|x) at θ + t·direction, t = 0, by one JVP per batch -> `[len(pairs), 2]`."""

    def logps(p, batch):  # -> [B, 2]
        return logprobs.pair_logprobs(lm, p, batch)[0]

    jvp = jax.jit(lambda p, d, batch: jax.jvp(lambda q: logps(q, batch), (p,), (d,))[1])
    out = np.zeros((len(pairs), 2))
    for rows, batch in _batches(lm, pairs, batch_size, pad_to_multiple):
        out[rows] = np.asarray(jvp(lm.params, direction, batch))[: len(rows)]
    return out


def dataset_rates(
    lm, pairs: Sequence[TokenizedPair], loss: LossConfig | None = None, batch_size: int = 8
) -> np.ndarray:
    """The first-order change of every pair's ln π(y+|x) per unit learning rate under one
    full-batch gradient step on the mean `loss` (DPO by default) over all pairs: −⟨g+_i, ∇L⟩,
    `[len(pairs)]` float64. Negative: that pair's preferred response is displaced."""
    grad = dataset_gradient(lm, pairs, loss or LossConfig("dpo"), batch_size)
    step = jax.tree.map(jnp.negative, grad)
    return directional_change(lm, pairs, step, batch_size)[:, 0]


def pair_logps(lm, pairs, params=None, batch_size: int = 8, pad_to_multiple: int = 32):
    """ln π(y±|x) `[len(pairs), 2]` under `params` (default the model's own)."""
    params = lm.params if params is None else params

    def logps(p, batch):  # -> [B, 2]
        return logprobs.pair_logprobs(lm, p, batch)[0]

    run = jax.jit(logps)
    out = np.zeros((len(pairs), 2))
    for rows, batch in _batches(lm, pairs, batch_size, pad_to_multiple):
        out[rows] = np.asarray(run(params, batch))[: len(rows)]
    return out


def update_rates(
    lm,
    pairs: Sequence[TokenizedPair],
    optimizer: OptimizerConfig,
    loss: LossConfig | None = None,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Every pair's ln π(y+|x) change under the optimizer's actual first update u on the mean
    `loss` over all pairs (RMSProp's first step is sign-like, not along −∇L): `linear`, the
    first-order change ⟨g+_i, u⟩, and `measured`, ln π(y+_i) after the update minus before,
    both `[len(pairs)]` float64; their agreement checks the linearisation at this lr."""
    grad = dataset_gradient(lm, pairs, loss or LossConfig("dpo"), batch_size)
    opt = make_optimizer(optimizer)
    update, _ = opt.update(grad, opt.init(lm.params), lm.params)
    moved = jax.tree.map(jnp.add, lm.params, update)
    before = pair_logps(lm, pairs, batch_size=batch_size)[:, 0]
    after = pair_logps(lm, pairs, moved, batch_size=batch_size)[:, 0]
    linear = directional_change(lm, pairs, update, batch_size)[:, 0]
    return {"linear": linear, "measured": after - before}


# ---------------------------------------------------------------------------------------------
# The rate restricted to the unconstrained-features model's parameters (Theorem 4's check)


def head_gram(model, params, batch):
    """Packed PairBatch sequences (shared_prefix) -> `[B, 2, 2]` Gram matrices of g± restricted
    to the parameters of the unconstrained-features model (SPEC §5): the unembedding W as the
    LM head only (a tied input embedding is held fixed) and the final hidden states, one free
    vector added to each state of the packed row (after the final norm, the LM head's input).
    Every weight below the final norm is held fixed. In the packed row y+ and y− read the
    prompt's last state h_x, one variable, as the model's shared h_x."""
    head_key = "embed" if model.config.tie_embeddings else "lm_head"

    def flat(x):
        return x.reshape(-1, x.shape[-1])

    def gram(one):  # one pair's fields [1, ...]
        single = jax.tree.map(lambda x: x[None], one)
        layout = TokenLayout(flat(single.positions), flat(single.segments))
        hidden = model.hidden_states(params, flat(single.input_ids), layout=layout)  # [1, S, d]
        hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))

        def logps(theta):  # (W [V, d], delta [1, S, d]) -> [2]
            w, delta = theta
            states = jnp.take_along_axis(
                hidden + delta, flat(single.predict_from)[..., None], axis=1
            )
            head = {**params, head_key: w}
            lp = logprobs.response_logprobs(model, head, states, flat(single.target_ids))
            weights = logprobs.segment_weights(single.target_segments)  # [1, 1, T, 2]
            return jnp.einsum("brt,brtj->bj", lp.reshape(single.target_ids.shape), weights)[0]

        theta = (model.unembedding(params).astype(jnp.float32), jnp.zeros_like(hidden))
        return sum(leaf_gram(g) for g in jax.tree.leaves(jax.jacrev(logps)(theta)))

    return jax.lax.map(gram, batch)


def head_rates(lm, pairs: Sequence[TokenizedPair], batch_size: int = 4) -> dict[str, np.ndarray]:
    """RATE_KEYS of every pair with the gradients restricted to the unconstrained-features
    model's parameters (`head_gram`), in `pairs` order: dict of `[len(pairs)]` float64."""
    kernel = jax.jit(lambda params, batch: head_gram(lm, params, batch))

    def batches():
        for batch in ches.length_batches(lm, pairs, batch_size, 32, "shared_prefix"):
            real = batch.valid > 0
            gram = np.asarray(kernel(lm.params, jax.tree.map(jnp.asarray, batch.sequences())))
            yield {"index": batch.index[real], **rates_from_gram(gram[real])}

    return ches.collect(batches(), pairs, RATE_KEYS)


def theorem4_inner(lm, pairs: Sequence[TokenizedPair]) -> dict[str, np.ndarray]:
    """Theorem 4's closed form (`flow.theorems.theorem4`, float64) at the real model's prompt
    state h_x (the final hidden state that predicts the response token) and unembedding W, for
    single-token pairs -> dict of `[n]` float64: its terms `m`, `unembedding_alignment`,
    `other_token_alignment` and `inner`, their sum: ⟨g+, g+ − g−⟩ over (W, h_x), which is
    Theorem 4's rate divided by −ℓ′ (ℓ′ drops out: the rate here is per unit −ℓ′)."""
    from ld_jax.flow import state, theorems

    if any(len(p.chosen_ids) != 1 or len(p.rejected_ids) != 1 for p in pairs):
        raise LdJaxError("theorem4_inner: every response must be one token")

    def states(params, batch):
        hidden, _ = logprobs.pair_hidden_states(lm, params, batch)  # [B, T, d]
        return hidden[:, 0]  # the state predicting y+'s token: the prompt's last, h_x

    run = jax.jit(states)
    h_x = np.zeros((len(pairs), lm.config.d_model))
    for rows, batch in _batches(lm, pairs, 8, 32):
        h_x[rows] = np.asarray(run(lm.params, batch))[: len(rows)]
    w = np.asarray(lm.unembedding(lm.params), np.float64)
    keys = ("m", "unembedding_alignment", "other_token_alignment")
    out = {k: np.zeros(len(pairs)) for k in keys}
    with jax.enable_x64(True):

        @jax.jit
        def terms(w, h, y_plus, y_minus):
            zero, none = jnp.zeros(1), jnp.zeros(0, jnp.int32)
            one = jnp.zeros((1, 1), jnp.int32)  # the one state, row 0 of h, predicts both
            problem = state.Problem(
                y_plus[None, None],
                one,
                y_minus[None, None],
                one,
                zero,
                zero,
                zero,
                zero,
                none,
                none,
                jnp.int32(0),
            )
            got = theorems.theorem4({"W": w, "h": h[None]}, problem, LossConfig("dpo"))
            return [got[k] for k in keys]

        w64 = jnp.asarray(w)
        for i, p in enumerate(pairs):
            got = terms(w64, jnp.asarray(h_x[i]), p.chosen_ids[0], p.rejected_ids[0])
            for k, v in zip(keys, got):
                out[k][i] = float(v)
    out["inner"] = sum(out[k] for k in keys)
    return out
