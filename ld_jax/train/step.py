"""The pure training step `(state, batch) -> (state, metrics)` and its jitted, sharded form.

One step is one optimizer update: chosen and rejected log-probs in one forward pass
(`logprobs.pair_logprobs`), the preference loss against the batch's reference log-probs,
gradients, one optax update. The loss is the mean over the batch's *valid* pairs; padding rows
(the end of an epoch, or rows that round a batch up to the devices) weigh nothing.

Gradient accumulation happens inside the step: with `micro_batches = k` the batch's rows are
split into k interleaved micro-batches (rows j, j+k, j+2k, ... form micro-batch j, so each
device keeps its own rows) that run one after another under `lax.scan`, summing the gradient of
Σ valid·loss / (valid pairs of the whole batch). The update is therefore exactly that of the
whole batch at once, whatever the micro-batches' share of valid rows; only the activations of
one micro-batch are live at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ld_jax.data.batch import PairBatch
from ld_jax.logprobs import pair_logprobs
from ld_jax.losses import LossConfig, preference_loss
from ld_jax.models.constraints import batch_sharded
from ld_jax.train.sharding import BATCH, batch_shardings
from ld_jax.train.state import TrainState

# The step's one per-pair output, [B] (NaN on padding rows): ln π(y+|x) − ln π_ref(y+|x), of
# which the loop logs quantiles (`train.writers.displacement`).
PER_PAIR = "pair_chosen_logp_change"


def batch_losses(loss_cfg: LossConfig, logps, lengths, batch):
    """Per-pair losses and loss metrics `[B]` from log-probs and lengths `[B, 2]`; batch: a
    PairBatch (or anything with `ref_logps` and `rewards` `[B, 2]`)."""
    ref, rewards = batch.ref_logps, batch.rewards
    lengths = jnp.maximum(lengths, 1.0)  # padding rows have none; keeps 1/|y| finite there
    return preference_loss(
        loss_cfg,
        logps[:, 0],
        logps[:, 1],
        ref[:, 0],
        ref[:, 1],
        chosen_len=lengths[:, 0],
        rejected_len=lengths[:, 1],
        reward_chosen=rewards[:, 0],
        reward_rejected=rewards[:, 1],
    )


def micro_batches_of(batch, k: int):
    """Batch arrays `[B, ...]` -> `[k, B/k, ...]`, micro-batch j holding rows j, j+k, ..."""
    return jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(
    state: TrainState, batch, *, model, loss_cfg, optimizer, seq_chunk=None, micro_batches=1
):
    """batch: a `PairBatch` with `ref_logps` `[B, 2]`, B a multiple of `micro_batches`. Returns
    the new state and scalar metrics (means over valid pairs; `tokens` counts their tokens as
    two sequences, `PairBatch.pair_tokens`), plus `PER_PAIR` `[B]`."""
    n = jnp.maximum(batch.valid.sum(), 1.0)

    def weighted_sums(params, mb):
        """(Σ valid·loss / n, Σ valid·statistic) over one micro-batch; grad of the first."""
        logps, lengths = pair_logprobs(model, params, mb, seq_chunk)
        losses, lm = batch_losses(loss_cfg, logps, lengths, mb)
        change = logps - mb.ref_logps  # the reference is the initial model
        stats = {
            "loss": losses,
            "chosen_logp": logps[:, 0],
            "rejected_logp": logps[:, 1],
            "chosen_logp_change": change[:, 0],
            "rejected_logp_change": change[:, 1],
            "fraction_chosen_fell": (change[:, 0] < 0).astype(jnp.float32),
            "reward_accuracy": lm["accuracy"],
            "margin": lm["margin"],
            "tokens": mb.pair_tokens(),
        }
        sums = {k: jnp.sum(v * mb.valid) for k, v in stats.items()}
        # per pair, NaN on padding rows: the host takes quantiles of it (`PER_PAIR`)
        per_pair = jnp.where(mb.valid > 0, change[:, 0], jnp.nan)
        return sums["loss"] / n, (sums, per_pair)

    grad_fn = jax.grad(weighted_sums, has_aux=True)
    if micro_batches == 1:
        grads, (sums, per_pair) = grad_fn(state.params, batch)
    else:

        def accumulate(total, mb):
            grads, (sums, per_pair) = grad_fn(state.params, mb)
            return jax.tree.map(jnp.add, total, (grads, sums)), per_pair

        first = jax.tree.map(lambda x: x[0], micro_batches_of(batch, micro_batches))
        grads_shape, (sums_shape, _) = jax.eval_shape(grad_fn, state.params, first)
        zeros = jax.tree.map(jnp.zeros_like, (grads_shape, sums_shape))
        (grads, sums), per_pair = jax.lax.scan(
            accumulate, zeros, micro_batches_of(batch, micro_batches)
        )
        per_pair = per_pair.reshape(-1)  # [k, B/k]: the order does not matter to quantiles
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v if k == "tokens" else v / n for k, v in sums.items()}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics[PER_PAIR] = per_pair
    return TrainState(state.step + 1, params, opt_state), metrics


def compile_step(
    model, loss_cfg, optimizer, mesh, state_shardings, batch, seq_chunk=None, micro_batches=1
):
    """`train_step` under jit with explicit shardings; the input state's buffers are donated.

    batch: an example batch (host arrays or ShapeDtypeStructs), for the batch shardings.
    state_shardings: where the state lives between steps. Optimizer-state leaves in host memory
    (`sharding.offload_optimizer_state`) are moved to the device for the update and back, so
    that they take no HBM while the forward and backward passes run.
    """
    host = state_shardings.opt_state
    device = jax.tree.map(lambda s: s.with_memory_kind("device"), host)
    if device != host:
        optimizer = _updating_on_device(optimizer, device, host)

    def step(state, batch):
        with batch_sharded(NamedSharding(mesh, BATCH)):  # activations too (models/constraints)
            return train_step(
                state,
                batch,
                model=model,
                loss_cfg=loss_cfg,
                optimizer=optimizer,
                seq_chunk=seq_chunk,
                micro_batches=micro_batches,
            )

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(batch, mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def _updating_on_device(optimizer, device, host) -> optax.GradientTransformation:
    """`optimizer` whose state lives in host memory: moved in just for the update, and out."""

    def update(grads, opt_state, params=None):
        updates, opt_state = optimizer.update(grads, jax.device_put(opt_state, device), params)
        return updates, jax.device_put(opt_state, host)

    return optax.GradientTransformation(optimizer.init, update)


def compile_logprobs(model, mesh, param_shardings, seq_chunk=None):
    """jit of (params, PairBatch.sequences()) -> log-probs `[B, 2]`, replicated: for the
    reference log-probs and the final evaluation."""
    example = PairBatch(0, 0, 0, 0, 0, 0)  # the sequence fields; the others are None

    def logprobs(params, seqs):
        with batch_sharded(NamedSharding(mesh, BATCH)):
            return pair_logprobs(model, params, seqs, seq_chunk)[0]

    return jax.jit(
        logprobs,
        in_shardings=(param_shardings, batch_shardings(example, mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )
