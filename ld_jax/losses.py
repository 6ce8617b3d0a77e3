"""Preference losses of SPEC §2, written over sequence log-probs.

Every loss is ℓ(u) of a margin u built from the policy's (and usually the reference's) sequence
log-probs. `preference_loss` builds the margin (plain, length-weighted or DPOP-shifted), applies
ℓ, and adds the optional SFT term −λ·ln π(y+|x) of CPO/RPO (paper eq. 4).

All arrays are `[batch]`. Sequence log-probs are sums over response tokens (SPEC §1); the lengths
are response token counts, used only by the length-normalised variants.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# Convex f's of the GPO family (Tang et al. 2024), each of the scaled margin ρ = β(u − Δ_ref).
GPO_FUNCTIONS: dict[str, Callable[[Array], Array]] = {
    "logistic": lambda r: jax.nn.softplus(-r),  # = DPO
    "hinge": lambda r: jax.nn.relu(1.0 - r),  # = SLiC with a reference
    "squared": lambda r: (r - 1.0) ** 2,  # = IPO up to scaling
    "exponential": lambda r: jnp.exp(-r),
    "truncated_quadratic": lambda r: jax.nn.relu(1.0 - r) ** 2,
    "savage": lambda r: jax.nn.sigmoid(-r) ** 2,
}

LOSS_NAMES = ("dpo", "ipo", "slic", "rebel", "gpo", "simpo", "dpop")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which ℓ to use and its hyperparameters (paper values as defaults).

    name: one of LOSS_NAMES. `simpo` and `dpop` are presets of the weighted form (paper eq. 5).
    sft_lambda: coefficient λ of the SFT term −λ·ln π(y+|x) (CPO/RPO); 0 disables it.
    """

    name: str = "dpo"
    beta: float = 0.1
    tau: float = 0.01  # IPO
    ipo_length_average: bool = False  # IPO on per-token mean log-probs, as TRL's "ipo" does
    delta: float = 1.0  # SLiC margin
    eta: float = 1.0  # REBEL
    gpo_f: str = "logistic"
    simpo_gamma: float = 0.5  # SimPO target reward margin γ
    dpop_lambda: float = 50.0  # DPOP penalty weight
    sft_lambda: float = 0.0
    sft_length_average: bool = False  # RPO normalises the NLL by length

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.name == "gpo" and self.gpo_f not in GPO_FUNCTIONS:
            raise ValueError(
                f"unknown GPO function {self.gpo_f!r}; choose one of {', '.join(GPO_FUNCTIONS)}"
            )


def preference_loss(
    cfg: LossConfig,
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array | None = None,
    ref_rejected: Array | None = None,
    chosen_len: Array | None = None,
    rejected_len: Array | None = None,
    reward_chosen: Array | None = None,
    reward_rejected: Array | None = None,
    gpo_f: Callable[[Array], Array] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-sample losses `[batch]` and per-sample metrics (each `[batch]`).

    policy_* / ref_*: sequence log-probs ln π(y±|x), summed over response tokens, `[batch]`.
    *_len: response token counts `[batch]` (SimPO, length-averaged IPO/SFT).
    reward_*: scalar rewards r(x, y±) `[batch]` (REBEL only).
    gpo_f: a custom convex f for `name="gpo"`, overriding `cfg.gpo_f`.
    """
    name = cfg.name
    needs_ref = name not in ("slic", "simpo")
    if needs_ref and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss {name!r} needs reference log-probs")
    if name == "rebel" and (reward_chosen is None or reward_rejected is None):
        raise ValueError("loss 'rebel' needs reward_chosen and reward_rejected")
    if (name == "simpo" or cfg.ipo_length_average or cfg.sft_length_average) and (
        chosen_len is None or rejected_len is None
    ):
        raise ValueError(f"loss {name!r} with length normalisation needs chosen_len/rejected_len")

    pc, pr = policy_chosen, policy_rejected
    if name == "ipo" and cfg.ipo_length_average:
        pc, pr = pc / chosen_len, pr / rejected_len
        ref_c, ref_r = ref_chosen / chosen_len, ref_rejected / rejected_len
    else:
        ref_c, ref_r = ref_chosen, ref_rejected

    if name == "simpo":
        # Weighted form with λ± = 1/|y±|, reference-free (Meng et al. 2024; TRL "simpo").
        margin = pc / chosen_len - pr / rejected_len
        losses = jax.nn.softplus(-(cfg.beta * margin - cfg.simpo_gamma))
    elif name == "slic":
        margin = pc - pr
        losses = jax.nn.relu(cfg.delta - margin)
    else:
        margin = (pc - ref_c) - (pr - ref_r)  # u − Δ_ref
        if name == "dpo":
            losses = jax.nn.softplus(-cfg.beta * margin)
        elif name == "ipo":
            losses = (margin - 1.0 / (2.0 * cfg.tau)) ** 2
        elif name == "rebel":
            losses = (margin / cfg.eta - (reward_chosen - reward_rejected)) ** 2
        elif name == "gpo":
            f = gpo_f if gpo_f is not None else GPO_FUNCTIONS[cfg.gpo_f]
            losses = f(cfg.beta * margin)
        else:  # dpop: the preferred log-prob gets an extra weight only below its reference value
            penalty = jax.nn.relu(ref_chosen - policy_chosen)
            losses = jax.nn.softplus(-cfg.beta * (margin - cfg.dpop_lambda * penalty))

    if cfg.sft_lambda:
        nll = -policy_chosen / chosen_len if cfg.sft_length_average else -policy_chosen
        losses = losses + cfg.sft_lambda * nll

    metrics = {"margin": margin, "accuracy": (margin > 0).astype(jnp.float32)}
    if needs_ref:
        metrics["reward_chosen"] = cfg.beta * (policy_chosen - ref_chosen)
        metrics["reward_rejected"] = cfg.beta * (policy_rejected - ref_rejected)
    return losses, metrics
