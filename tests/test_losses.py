"""Preference losses against their closed forms (SPEC §2, written here in float64 NumPy) and
against TRL's DPOTrainer on the same log-probs."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from ld_jax.losses import LossConfig, preference_loss

B = 16


@pytest.fixture
def logps():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (-rng.uniform(1.0, 40.0, B) for _ in range(4))
    lc, lr = rng.integers(1, 30, B).astype(np.float64), rng.integers(1, 30, B).astype(np.float64)
    wc, wr = rng.normal(size=B), rng.normal(size=B)
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, lc=lc, lr=lr, wc=wc, wr=wr)


def _ours(cfg, d, **kw):
    def f32(a):
        return jnp.asarray(a, jnp.float32)

    losses, metrics = preference_loss(
        cfg,
        f32(d["pc"]),
        f32(d["pr"]),
        f32(d["rc"]),
        f32(d["rr"]),
        chosen_len=f32(d["lc"]),
        rejected_len=f32(d["lr"]),
        reward_chosen=f32(d["wc"]),
        reward_rejected=f32(d["wr"]),
        **kw,
    )
    return np.asarray(losses, np.float64), metrics


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _closed_forms(d):
    """SPEC §2, term by term. u = ln π(y+) − ln π(y−), Δ_ref the same for the reference."""
    u, dref = d["pc"] - d["pr"], d["rc"] - d["rr"]
    beta, tau, delta, eta, lam = 0.1, 0.01, 2.0, 0.7, 0.3
    below = (d["pc"] < d["rc"]).astype(float)
    return {
        "dpo": (LossConfig("dpo", beta=beta), -_log_sigmoid(beta * (u - dref))),
        "ipo": (LossConfig("ipo", tau=tau), (u - dref - 1 / (2 * tau)) ** 2),
        "slic": (LossConfig("slic", delta=delta), np.maximum(0.0, delta - u)),
        "rebel": (
            LossConfig("rebel", eta=eta),
            ((u - dref) / eta - d["wc"] + d["wr"]) ** 2,
        ),
        "gpo_squared": (LossConfig("gpo", gpo_f="squared"), (beta * (u - dref) - 1) ** 2),
        "gpo_exponential": (
            LossConfig("gpo", gpo_f="exponential"),
            np.exp(-beta * (u - dref)),
        ),
        "sft_dpo": (
            LossConfig("dpo", sft_lambda=lam),
            -_log_sigmoid(beta * (u - dref)) - lam * d["pc"],
        ),
        "sft": (LossConfig("sft"), -d["pc"]),  # plain NLL of y+; y− and the reference unused
        "sft_length_average": (LossConfig("sft", sft_length_average=True), -d["pc"] / d["lc"]),
        "weighted": (
            LossConfig("weighted", weight_chosen=1.5, weight_rejected=0.5),
            -_log_sigmoid(beta * (1.5 * (d["pc"] - d["rc"]) - 0.5 * (d["pr"] - d["rr"]))),
        ),
        # SimPO (Meng et al. 2024, eq. 6): −ln σ(β/|y+|·ln π(y+) − β/|y−|·ln π(y−) − γ)
        "simpo": (
            LossConfig("simpo", beta=2.0, simpo_gamma=0.5),
            -_log_sigmoid(2.0 * d["pc"] / d["lc"] - 2.0 * d["pr"] / d["lr"] - 0.5),
        ),
        # DPOP (Pal et al. 2024, eq. 3): −ln σ(β(ratio+ − ratio− − λ·max(0, ln π_ref(y+) − ln π(y+))))
        "dpop": (
            LossConfig("dpop", dpop_lambda=5.0),
            -_log_sigmoid(
                beta
                * ((d["pc"] - d["rc"]) - (d["pr"] - d["rr"]) - 5.0 * below * (d["rc"] - d["pc"]))
            ),
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "dpo",
        "ipo",
        "slic",
        "rebel",
        "gpo_squared",
        "gpo_exponential",
        "sft_dpo",
        "sft",
        "sft_length_average",
        "weighted",
        "simpo",
        "dpop",
    ],
)
def test_loss_matches_closed_form(logps, name):
    cfg, expected = _closed_forms(logps)[name]
    ours, _ = _ours(cfg, logps)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-6)


def test_dpop_samples_on_both_sides_of_the_reference(logps):
    below = logps["pc"] < logps["rc"]
    assert below.any() and (~below).any()  # so the closed-form test exercises both branches


def test_gpo_takes_a_custom_convex_f(logps):
    u, dref = logps["pc"] - logps["pr"], logps["rc"] - logps["rr"]
    ours, _ = _ours(LossConfig("gpo", beta=0.2), logps, gpo_f=lambda r: jnp.log1p(r**2))
    np.testing.assert_allclose(ours, np.log1p((0.2 * (u - dref)) ** 2), rtol=2e-5)


def test_dpo_at_init_is_exactly_ln2(logps):
    lp = jnp.asarray(logps["pc"], jnp.float32), jnp.asarray(logps["pr"], jnp.float32)
    losses, metrics = preference_loss(LossConfig("dpo"), *lp, *lp)
    assert (np.asarray(losses) == np.float32(np.log(2.0))).all()
    assert (np.asarray(metrics["accuracy"]) == 0).all()


def test_missing_inputs_are_rejected():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(LossConfig("dpo"), x, x)
    with pytest.raises(ValueError, match="reward"):
        preference_loss(LossConfig("rebel"), x, x, x, x)
    with pytest.raises(ValueError, match="chosen_len"):
        preference_loss(LossConfig("simpo"), x, x)
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig("kto")


# ---- TRL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A real DPOTrainer (tiny random Llama, character tokenizer) whose `_compute_loss` we feed
    with given per-token log-probs through a stub model, so both sides see the same numbers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *"abcdefgh"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    data = Dataset.from_dict({"prompt": ["ab", "cd"], "chosen": ["e", "f"], "rejected": ["g", "h"]})
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to=[],
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=True,
        per_device_train_batch_size=2,
    )
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _trl_loss(trainer, loss_types, loss_weights, beta, d, seq=32):
    """TRL's batch loss for sequence log-probs `d`, each split evenly over its response tokens."""
    import torch

    n = len(d["pc"])
    lens = np.concatenate([d["lc"], d["lr"]]).astype(int)
    totals = np.concatenate([d["pc"], d["pr"]])
    completion = np.zeros((2 * n, seq), np.int64)
    per_token = np.zeros((2 * n, seq - 1))
    for i, (length, total) in enumerate(zip(lens, totals)):
        completion[i, seq - length :] = 1  # prompt first, response last (no padding needed)
        per_token[i, seq - 1 - length :] = total / length

    class Stub:
        def __call__(self, **kw):
            t = torch.tensor(per_token, dtype=torch.float32)
            return type("Out", (), dict(log_probs=t, entropy=t, mean_logits=t, is_top1=t > 0))()

    trainer.loss_types, trainer.loss_weights, trainer.beta = loss_types, loss_weights, beta
    inputs = {
        "input_ids": torch.ones((2 * n, seq), dtype=torch.long),
        "attention_mask": torch.ones((2 * n, seq), dtype=torch.long),
        "completion_mask": torch.tensor(completion),
        "ref_chosen_logps": torch.tensor(d["rc"], dtype=torch.float32),
        "ref_rejected_logps": torch.tensor(d["rr"], dtype=torch.float32),
    }
    with torch.no_grad():
        return float(trainer._compute_loss(Stub(), inputs, return_outputs=False))


@pytest.mark.parametrize(
    "trl_types,trl_weights,cfg,equal_lengths",
    [
        (["sigmoid"], [1.0], LossConfig("dpo", beta=0.1), False),
        (["sigmoid"], [1.0], LossConfig("dpo", beta=0.5), False),
        (["ipo"], [1.0], LossConfig("ipo", tau=0.1, ipo_length_average=True), False),
        (["hinge"], [1.0], LossConfig("gpo", gpo_f="hinge", beta=0.1), False),
        # RPO: TRL averages the NLL over all chosen tokens of the batch, which equals the mean of
        # per-sample length averages only when all chosen responses have the same length.
        (
            ["sigmoid", "sft"],
            [1.0, 0.3],
            LossConfig("dpo", sft_lambda=0.3, sft_length_average=True),
            True,
        ),
        (["sft"], [1.0], LossConfig("sft", sft_length_average=True), True),
    ],
)
def test_matches_trl(trl_trainer, logps, trl_types, trl_weights, cfg, equal_lengths):
    d = dict(logps)
    if equal_lengths:
        d["lc"] = np.full(B, 7.0)
    ours, _ = _ours(cfg, d)
    beta = cfg.tau if cfg.name == "ipo" else cfg.beta  # TRL's β is IPO's τ
    theirs = _trl_loss(trl_trainer, trl_types, trl_weights, beta, d)
    np.testing.assert_allclose(ours.mean(), theirs, rtol=1e-5)


# ---- the losses peers ship (#24) ----------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _peer_closed_forms(d):
    """Each paper's formula in float64, from h± = ln π(y±) − ln π_ref(y±), u = h+ − h−."""
    hc, hr = d["pc"] - d["rc"], d["pr"] - d["rr"]
    u = hc - hr
    b, eps = 0.1, 0.2
    return {
        # NCA (Chen et al. 2024, arXiv 2402.05369), pairwise as TRL's nca_pair
        "nca": (
            LossConfig("nca", beta=b),
            -_log_sigmoid(b * hc) - 0.5 * _log_sigmoid(-b * hc) - 0.5 * _log_sigmoid(-b * hr),
        ),
        # APO (D'Oosterlinck et al. 2024, arXiv 2408.06266) eqs. 7 and 8
        "apo_zero": (LossConfig("apo_zero", beta=b), 1 - _sigmoid(b * hc) + _sigmoid(b * hr)),
        "apo_down": (LossConfig("apo_down", beta=b), _sigmoid(b * hc) + 1 - _sigmoid(b * u)),
        # robust DPO (Chowdhury et al. 2024, arXiv 2403.00409) eq. 4
        "robust": (
            LossConfig("robust", beta=b, label_smoothing=eps),
            ((1 - eps) * -_log_sigmoid(b * u) - eps * -_log_sigmoid(-b * u)) / (1 - 2 * eps),
        ),
        # EXO (Ji et al. 2024, arXiv 2402.00856): KL between (σ(βu), σ(−βu)) and (1 − ε, ε)
        "exo": (
            LossConfig("exo", beta=b, label_smoothing=eps),
            _sigmoid(b * u) * np.log(_sigmoid(b * u) / (1 - eps))
            + _sigmoid(-b * u) * np.log(_sigmoid(-b * u) / eps),
        ),
        # BCO on pairs (Jung et al. 2024, arXiv 2404.04656) with δ = 0
        "bco_pair": (
            LossConfig("bco_pair", beta=b),
            -np.log(_sigmoid(b * hc)) - np.log(_sigmoid(-b * hr)),
        ),
        # Cal-DPO (Xiao et al. 2024, arXiv 2412.14516), as the authors' code: the calibration
        # term weighs ½ and the DPO term takes the unscaled log-ratio margin
        "cal_dpo": (
            LossConfig("cal_dpo", beta=b),
            -np.log(_sigmoid(u)) + 0.5 * ((hc - 1 / (2 * b)) ** 2 + (hr + 1 / (2 * b)) ** 2),
        ),
        # DPO-Shift (Yang et al. 2025, arXiv 2502.07599) with a fixed f(λ) = 0.8
        "dpo_shift": (
            LossConfig("dpo_shift", beta=b, dpo_shift_lambda=0.8),
            -np.log(_sigmoid(b * hc - 0.8 * b * hr)),
        ),
    }


@pytest.mark.parametrize(
    "name", ["nca", "apo_zero", "apo_down", "robust", "exo", "bco_pair", "cal_dpo", "dpo_shift"]
)
def test_peer_loss_matches_its_paper(logps, name):
    cfg, expected = _peer_closed_forms(logps)[name]
    ours, metrics = _ours(cfg, logps)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-6)
    if name != "dpo_shift":  # a preset of `weighted`, whose margin is the weighted one
        u = (logps["pc"] - logps["rc"]) - (logps["pr"] - logps["rr"])
        np.testing.assert_allclose(np.asarray(metrics["margin"]), u, rtol=1e-5, atol=1e-4)


def test_robust_without_noise_is_dpo_and_exo_needs_a_noise_rate(logps):
    np.testing.assert_allclose(
        _ours(LossConfig("robust", label_smoothing=0.0), logps)[0],
        _ours(LossConfig("dpo"), logps)[0],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        LossConfig("exo")
    with pytest.raises(ValueError, match="unknown TRL loss_type"):
        LossConfig(loss_type="kto_pair")


def test_trl_loss_types_set_trl_semantics():
    ipo = LossConfig(loss_type="ipo", beta=0.3)
    assert (ipo.name, ipo.ipo_length_average, ipo.tau) == ("ipo", True, 0.3)
    assert LossConfig(loss_type="sigmoid").name == "dpo"
    hinge = LossConfig(loss_type="hinge")
    assert (hinge.name, hinge.gpo_f) == ("gpo", "hinge")
    assert LossConfig(loss_type="exo_pair", label_smoothing=1e-3).name == "exo"
    # a config written with loss_type reads back the same (what resume and run identity see)
    from ld_jax.config import from_dict, to_dict

    assert from_dict(LossConfig, to_dict(ipo)) == ipo


@pytest.mark.parametrize(
    "loss_type,kw",
    [
        ("sigmoid", {}),
        ("hinge", {}),
        ("ipo", {}),
        ("nca_pair", {}),
        ("apo_zero", {}),
        ("apo_down", {}),
        ("robust", {"label_smoothing": 0.2}),
        ("exo_pair", {"label_smoothing": 0.2}),
        ("bco_pair", {}),
    ],
)
def test_trl_loss_types_match_trl(trl_trainer, logps, loss_type, kw):
    """Our loss under TRL's loss_type equals TRL's DPOTrainer on the same log-probs."""
    cfg = LossConfig(loss_type=loss_type, beta=0.1, **kw)
    ours, _ = _ours(cfg, logps)
    trl_trainer.label_smoothing = kw.get("label_smoothing", 0.0)
    try:
        theirs = _trl_loss(trl_trainer, [loss_type], [1.0], 0.1, logps)
    finally:
        trl_trainer.label_smoothing = 0.0
    np.testing.assert_allclose(ours.mean(), theirs, rtol=1e-5)
