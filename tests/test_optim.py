"""The optimizer factory against PyTorch's own optimizers (the paper's RMSprop is PyTorch's)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from ld_jax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer


def _run_ours(cfg, w0, grads):
    opt = make_optimizer(cfg)
    params = {"w": jnp.asarray(w0)}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"])


def _run_torch(make, w0, grads):
    w = torch.nn.Parameter(torch.tensor(w0))
    opt = make([w])
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    return w.detach().numpy()


@pytest.mark.parametrize(
    "cfg, make",
    [
        (OptimizerConfig("rmsprop", lr=1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2)),
        (
            OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        ),
        (OptimizerConfig("sgd", lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-2)),
    ],
)
def test_matches_pytorch(cfg, make):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(6)]
    np.testing.assert_allclose(
        _run_ours(cfg, w0, grads), _run_torch(make, w0, grads), rtol=1e-5, atol=1e-6
    )


def test_clipping_and_schedules():
    w0 = np.zeros(2, np.float32)
    clipped = _run_ours(
        OptimizerConfig("sgd", lr=1.0, max_grad_norm=1.0), w0, [np.array([3.0, 4.0], np.float32)]
    )
    np.testing.assert_allclose(clipped, [-0.6, -0.8], rtol=1e-6)
    sched = learning_rate_schedule(
        OptimizerConfig(lr=1.0, schedule="linear", warmup_steps=2, total_steps=6)
    )
    np.testing.assert_allclose(
        [float(sched(s)) for s in range(7)], [0, 0.5, 1, 0.75, 0.5, 0.25, 0], atol=1e-6
    )
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(schedule="cosine")
