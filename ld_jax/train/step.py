"""The pure training step `(state, batch) -> (state, metrics)` and its jitted, sharded form.

One step: chosen and rejected log-probs in one forward pass (`logprobs.pair_logprobs`), the
preference loss against the batch's reference log-probs, gradients, one optax update. The loss
is the mean over the batch's valid pairs; padding rows contribute nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ld_jax.logprobs import pair_logprobs
from ld_jax.losses import LossConfig, preference_loss
from ld_jax.train.sharding import batch_shardings
from ld_jax.train.state import TrainState


def batch_losses(loss_cfg: LossConfig, logps, lengths, batch):
    """Per-pair losses and loss metrics `[B]` from log-probs and lengths `[B, 2]`."""
    ref, rewards = batch["ref_logps"], batch["rewards"]
    lengths = jnp.maximum(lengths, 1.0)  # padding rows have none; keeps 1/|y| finite there
    return preference_loss(
        loss_cfg, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1],
        chosen_len=lengths[:, 0], rejected_len=lengths[:, 1],
        reward_chosen=rewards[:, 0], reward_rejected=rewards[:, 1],
    )  # fmt: skip


def train_step(state: TrainState, batch, *, model, loss_cfg, optimizer, seq_chunk=None):
    """batch: the arrays of `data.pipeline` with `ref_logps` `[B, 2]`. Returns the new state and
    scalar metrics (means over valid pairs; `tokens` counts their non-padding tokens)."""
    valid = batch["valid"]
    n = jnp.maximum(valid.sum(), 1.0)

    def mean(x):
        return jnp.sum(x * valid) / n

    def loss_fn(params):
        logps, lengths = pair_logprobs(model, params, batch, seq_chunk)
        losses, metrics = batch_losses(loss_cfg, logps, lengths, batch)
        return mean(losses), (logps, metrics)

    (loss, (logps, lm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    change = logps - batch["ref_logps"]  # the reference is the initial model
    metrics = {
        "loss": loss,
        "chosen_logp": mean(logps[:, 0]),
        "rejected_logp": mean(logps[:, 1]),
        "chosen_logp_change": mean(change[:, 0]),
        "rejected_logp_change": mean(change[:, 1]),
        "reward_accuracy": mean(lm["accuracy"]),
        "margin": mean(lm["margin"]),
        "grad_norm": optax.global_norm(grads),
        "tokens": jnp.sum(batch["attention_mask"].sum((1, 2)) * valid),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def compile_step(model, loss_cfg, optimizer, mesh, state_shardings, batch, seq_chunk=None):
    """`train_step` under jit with explicit shardings; the input state's buffers are donated.

    batch: an example batch (host arrays), for the batch shardings.
    """

    def step(state, batch):
        return train_step(
            state, batch, model=model, loss_cfg=loss_cfg, optimizer=optimizer, seq_chunk=seq_chunk
        )

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(batch, mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask")


def compile_logprobs(model, mesh, param_shardings, seq_chunk=None):
    """jit of (params, {SEQUENCE_KEYS: [B, 2, S]}) -> log-probs `[B, 2]`, replicated: for the
    reference log-probs and the final evaluation."""
    example = dict.fromkeys(SEQUENCE_KEYS)
    return jax.jit(
        lambda params, seqs: pair_logprobs(model, params, seqs, seq_chunk)[0],
        in_shardings=(param_shardings, batch_shardings(example, mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )
