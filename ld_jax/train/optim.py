"""Optimizers and learning-rate schedules from config, all built from optax.

The paper trains with PyTorch's RMSprop (α = 0.99, ε = 1e-8 added outside the square root,
zero initial accumulator); `rmsprop` here reproduces exactly that update.
"""

from __future__ import annotations

import dataclasses

import optax

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "rmsprop"
    lr: float = 1e-7
    schedule: str = "constant"  # after warmup: constant, linear decay to 0, or cosine to 0
    warmup_steps: int = 0
    total_steps: int = 0  # needed by the linear and cosine schedules
    weight_decay: float = 0.0  # AdamW only
    rmsprop_decay: float = 0.99  # PyTorch's alpha
    eps: float = 1e-8
    b1: float = 0.9
    b2: float = 0.999
    max_grad_norm: float = 0.0  # global-norm clipping; 0 disables it
    # micro-batches per update: the step splits each batch into this many and runs them one
    # after another (train/step.py); the update equals the whole batch's, with less memory
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"schedule {self.schedule!r} needs total_steps > warmup_steps")
        if self.grad_accum_steps < 1:
            raise ValueError("grad_accum_steps must be >= 1")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0, then the configured decay (all in optimizer steps)."""
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, cfg.total_steps - cfg.warmup_steps)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, cfg.total_steps - cfg.warmup_steps)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation: clipping -> optimizer. (Gradient accumulation is the step's
    job, `grad_accum_steps`: it weighs every valid pair of an update alike, which optax's
    MultiSteps cannot do for micro-batches with different numbers of valid rows.)"""
    lr = learning_rate_schedule(cfg)
    if cfg.name == "rmsprop":
        opt = optax.rmsprop(lr, decay=cfg.rmsprop_decay, eps=cfg.eps, eps_in_sqrt=False)
    elif cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(lr)
    if cfg.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt
