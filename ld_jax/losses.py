"""Preference losses of SPEC §2, written over sequence log-probs.

Every loss is ℓ(u) of a margin u built from the policy's (and usually the reference's) sequence
log-probs. `preference_loss` builds the margin (plain, or weighted by λ± as in paper eq. 5, of
which SimPO and DPOP are presets), applies ℓ, and adds the optional SFT term −λ·ln π(y+|x) of
CPO/RPO (paper eq. 4).

All arrays are `[batch]`. Sequence log-probs are sums over response tokens (SPEC §1); the lengths
are response token counts, used only by the length-normalised variants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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

LOSS_NAMES = (
    "dpo",
    "ipo",
    "slic",
    "rebel",
    "gpo",
    "weighted",
    "simpo",
    "dpop",
    "sft",
    # losses that peers ship (TRL's DPOTrainer) or papers publish; formulas in `_peer_loss`
    "nca",
    "apo_zero",
    "apo_down",
    "robust",
    "exo",
    "bco_pair",
    "cal_dpo",
    "dpo_shift",
)
_PEER_LOSSES = ("nca", "apo_zero", "apo_down", "robust", "exo", "bco_pair", "cal_dpo")

# TRL's DPOConfig.loss_type -> our LossConfig fields, with TRL's semantics. "beta" as a value
# copies β (TRL's IPO calls its τ β). TRL's "ipo" averages the log-probs over response tokens,
# our "ipo" (the paper's) does not; TRL's "sft" is the NLL per chosen token.
TRL_LOSS_TYPES: dict[str, dict] = {
    "sigmoid": {"name": "dpo"},
    "hinge": {"name": "gpo", "gpo_f": "hinge"},
    "ipo": {"name": "ipo", "ipo_length_average": True, "tau": "beta"},
    "sft": {"name": "sft", "sft_length_average": True},
    "nca_pair": {"name": "nca"},
    "apo_zero": {"name": "apo_zero"},
    "apo_down": {"name": "apo_down"},
    "robust": {"name": "robust"},
    "exo_pair": {"name": "exo"},
    "bco_pair": {"name": "bco_pair"},
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which ℓ to use and its hyperparameters (paper values as defaults).

    name: one of LOSS_NAMES. `weighted` is DPO's ℓ of the weighted margin of paper eq. 5,
        β(λ+·(ln π(y+) − ln π_ref(y+)) − λ−·(ln π(y−) − ln π_ref(y−))), with constant λ±;
        `simpo` (λ± = 1/|y±|, no reference, target margin γ) and `dpop` (λ+ = 1 + λ_DPOP while
        ln π(y+) is below its reference value, λ− = 1) are its presets.
    sft_lambda: coefficient λ of the SFT term −λ·ln π(y+|x) (CPO/RPO); 0 disables it.
        `sft` is that term alone with λ = 1, −ln π(y+|x) (y− is ignored): plain supervised
        fine-tuning through the same loop, e.g. E3's alignment warm-up.
    nca, apo_zero, apo_down, robust, exo, bco_pair, cal_dpo: the losses of `_peer_loss`;
        `dpo_shift` is `weighted` with λ+ = 1, λ− = dpo_shift_lambda (DPO-Shift's fixed f(λ)).
    loss_type: TRL's name instead of ours (TRL_LOSS_TYPES); it overrides `name` and the options
        where TRL means something else (its "ipo" is length-averaged with τ = β).
    docs/training.md has the table of every loss, its TRL name, formula and source.
    """

    name: str = "dpo"
    beta: float = 0.1
    tau: float = 0.01  # IPO
    ipo_length_average: bool = False  # IPO on per-token mean log-probs, as TRL's "ipo" does
    delta: float = 1.0  # SLiC margin
    eta: float = 1.0  # REBEL
    gpo_f: str = "logistic"
    weight_chosen: float = 1.0  # λ+ of the `weighted` loss
    weight_rejected: float = 1.0  # λ− of the `weighted` loss
    simpo_gamma: float = 0.5  # SimPO target reward margin γ
    dpop_lambda: float = 50.0  # DPOP penalty weight
    sft_lambda: float = 0.0
    sft_length_average: bool = False  # RPO normalises the NLL by length
    label_smoothing: float = 0.0  # ε of robust DPO and EXO (TRL's label_smoothing)
    dpo_shift_lambda: float = 0.95  # f(λ) of DPO-Shift: the weight of the rejected log-ratio
    # TRL's DPOConfig.loss_type (TRL_LOSS_TYPES): sets `name` and its options as TRL means them
    loss_type: str | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether ℓ reads ln π_ref (SLiC, SimPO and plain SFT do not)."""
        return self.name not in ("slic", "simpo", "sft")

    @property
    def needs_rewards(self) -> bool:
        """REBEL regresses the margin on r(x, y+) − r(x, y−): data without rewards cannot train it."""
        return self.name == "rebel"

    def __post_init__(self):
        if self.loss_type is not None:
            if self.loss_type not in TRL_LOSS_TYPES:
                raise ValueError(
                    f"unknown TRL loss_type {self.loss_type!r}; supported: "
                    f"{', '.join(TRL_LOSS_TYPES)}"
                )
            for field, value in TRL_LOSS_TYPES[self.loss_type].items():
                object.__setattr__(self, field, self.beta if value == "beta" else value)
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.name == "gpo" and self.gpo_f not in GPO_FUNCTIONS:
            raise ValueError(
                f"unknown GPO function {self.gpo_f!r}; choose one of {', '.join(GPO_FUNCTIONS)}"
            )
        if self.name == "exo" and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError("loss 'exo' needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3)")
        if self.name == "robust" and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("loss 'robust' needs 0 <= label_smoothing < 0.5")


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
    needs_ref = cfg.needs_reference
    length_normalised = name == "simpo" or (name == "ipo" and cfg.ipo_length_average)
    if needs_ref and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss {name!r} needs reference log-probs")
    if name == "rebel" and (reward_chosen is None or reward_rejected is None):
        raise ValueError("loss 'rebel' needs reward_chosen and reward_rejected")
    sft_weight = 1.0 if name == "sft" else cfg.sft_lambda
    if (length_normalised or (sft_weight and cfg.sft_length_average)) and (
        chosen_len is None or rejected_len is None
    ):
        raise ValueError(f"loss {name!r} with length normalisation needs chosen_len/rejected_len")

    pc, pr = policy_chosen, policy_rejected
    if name == "ipo" and cfg.ipo_length_average:
        pc, pr = pc / chosen_len, pr / rejected_len
        ref_c, ref_r = ref_chosen / chosen_len, ref_rejected / rejected_len
    else:
        ref_c, ref_r = ref_chosen, ref_rejected

    if name in _PEER_LOSSES:
        margin = (pc - ref_c) - (pr - ref_r)
        losses = _peer_loss(cfg, pc - ref_c, pr - ref_r)
    elif name in ("weighted", "simpo", "dpop", "dpo_shift"):
        lam_c, lam_r = _weights(cfg, policy_chosen, ref_chosen, chosen_len, rejected_len)
        if name == "simpo":  # reference-free (Meng et al. 2024; TRL "simpo")
            margin = lam_c * pc - lam_r * pr
        else:
            margin = lam_c * (pc - ref_c) - lam_r * (pr - ref_r)
        gamma = cfg.simpo_gamma if name == "simpo" else 0.0
        losses = jax.nn.softplus(-(cfg.beta * margin - gamma))
    elif name in ("slic", "sft"):
        margin = pc - pr
        losses = jax.nn.relu(cfg.delta - margin) if name == "slic" else jnp.zeros_like(margin)
    else:
        margin = (pc - ref_c) - (pr - ref_r)  # u − Δ_ref
        if name == "dpo":
            losses = jax.nn.softplus(-cfg.beta * margin)
        elif name == "ipo":
            losses = (margin - 1.0 / (2.0 * cfg.tau)) ** 2
        elif name == "rebel":
            losses = (margin / cfg.eta - (reward_chosen - reward_rejected)) ** 2
        else:  # gpo
            f = gpo_f if gpo_f is not None else GPO_FUNCTIONS[cfg.gpo_f]
            losses = f(cfg.beta * margin)

    if sft_weight:
        nll = -policy_chosen / chosen_len if cfg.sft_length_average else -policy_chosen
        losses = losses + sft_weight * nll

    metrics = {"margin": margin, "accuracy": (margin > 0).astype(jnp.float32)}
    if needs_ref:
        metrics["reward_chosen"] = cfg.beta * (policy_chosen - ref_chosen)
        metrics["reward_rejected"] = cfg.beta * (policy_rejected - ref_rejected)
    return losses, metrics


def _weights(cfg: LossConfig, policy_chosen, ref_chosen, chosen_len, rejected_len):
    """λ+ and λ− of the weighted form (paper eq. 5), each a scalar or `[batch]`."""
    if cfg.name == "simpo":
        return 1.0 / chosen_len, 1.0 / rejected_len
    if cfg.name == "dpo_shift":
        return 1.0, cfg.dpo_shift_lambda
    if cfg.name == "dpop":
        # Paper footnote 10: the extra weight is active only below the initial (reference) value.
        # The indicator carries no gradient, so this equals DPOP's −λ·max(0, ln π_ref − ln π) term.
        below = jax.lax.stop_gradient((policy_chosen < ref_chosen).astype(policy_chosen.dtype))
        return 1.0 + cfg.dpop_lambda * below, 1.0
    return cfg.weight_chosen, cfg.weight_rejected


def _peer_loss(cfg: LossConfig, h_chosen: Array, h_rejected: Array) -> Array:
    """ℓ of the losses in _PEER_LOSSES from the log-ratios h± = ln π(y±|x) − ln π_ref(y±|x)
    `[batch]`; u = h+ − h−, β = cfg.beta, ε = cfg.label_smoothing, σ the logistic function.
    docs/training.md has the table with each loss's source."""
    beta, eps = cfg.beta, cfg.label_smoothing
    log_sig = jax.nn.log_sigmoid
    r_c, r_r = beta * h_chosen, beta * h_rejected
    u = h_chosen - h_rejected
    if cfg.name == "nca":  # Chen et al. 2024, NCA for pairs: −ln σ(r+) − ½ln σ(−r+) − ½ln σ(−r−)
        return -log_sig(r_c) - 0.5 * log_sig(-r_c) - 0.5 * log_sig(-r_r)
    if cfg.name == "apo_zero":  # D'Oosterlinck et al. 2024 eq. 7: (1 − σ(r+)) + σ(r−)
        return 1.0 - jax.nn.sigmoid(r_c) + jax.nn.sigmoid(r_r)
    if cfg.name == "apo_down":  # eq. 8: σ(r+) + (1 − σ(βu))
        return jax.nn.sigmoid(r_c) + 1.0 - jax.nn.sigmoid(beta * u)
    if cfg.name == "robust":  # Chowdhury et al. 2024: unbiased under label flips with rate ε
        return (-(1.0 - eps) * log_sig(beta * u) + eps * log_sig(-beta * u)) / (1.0 - 2.0 * eps)
    if cfg.name == "exo":  # Ji et al. 2024 eq. 16 (K = 2): KL(softmax(βh±) ‖ (1 − ε, ε))
        q_w, q_l = jax.nn.sigmoid(beta * u), jax.nn.sigmoid(-beta * u)
        return q_w * (log_sig(beta * u) - jnp.log1p(-eps)) + q_l * (
            log_sig(-beta * u) - jnp.log(eps)
        )
    if cfg.name == "bco_pair":  # Jung et al. 2024, pairwise BCO without its running-mean shift
        return -log_sig(r_c) - log_sig(-r_r)
    # cal_dpo: Xiao et al. 2024 (arXiv 2412.14516), as the authors' code computes it: DPO's ℓ of
    # the unscaled u plus ½ the squared distance of h± from the reward scale ±1/(2β)
    target = 1.0 / (2.0 * beta)
    return -log_sig(u) + 0.5 * ((h_chosen - target) ** 2 + (h_rejected + target) ** 2)
