"""`ld-jax predictors`: its statistics against formulas it does not use, and the experiment end
to end on a tiny model (preference and Persona-style single-token data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
from conftest import save_tiny_llama, tiny_tokenizer

from ld_jax import cli
from ld_jax.experiments.predictors import report


def test_auroc_is_the_pairwise_order_probability():
    rng = np.random.default_rng(0)
    score, positive = rng.normal(size=40), rng.random(40) < 0.4
    score[:5] = score[5]  # ties count half
    pos, neg = score[positive], score[~positive]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert report.auroc(score, positive) == pytest.approx(pairs)
    assert np.isnan(report.auroc(score, np.zeros(40, bool)))


def test_partial_spearman_equals_the_first_order_partial_correlation_formula():
    rng = np.random.default_rng(1)
    z = rng.normal(size=200)
    x, y = z + rng.normal(size=200), z + 0.5 * rng.normal(size=200)
    r = lambda a, b: scipy.stats.spearmanr(a, b).statistic  # noqa: E731
    want = (r(x, y) - r(x, z) * r(y, z)) / np.sqrt((1 - r(x, z) ** 2) * (1 - r(y, z) ** 2))
    # a constant second control drops out of the regression
    got = report.partial_spearman(x, y, z, np.ones(200))
    assert got == pytest.approx(want, abs=1e-10)
    assert report.spearman(x, y) > 0.5 > abs(got)  # the shared length explains most of it


def test_predictors_end_to_end_on_a_tiny_model(tmp_path):
    model = str(save_tiny_llama(tmp_path / "model", tokenizer=tiny_tokenizer(markers=False)))
    rng = np.random.default_rng(2)
    words = ["yes", "no", "maybe", "the cat", "a long answer here", "ok"]
    rows = [
        {"prompt": f"Q{i}?", "chosen": " ".join(rng.choice(words, 2)), "rejected": str(i)}
        for i in range(8)
    ]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    persona = tmp_path / "persona.jsonl"
    persona.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Statement {i}: agree?",
                    "answer_matching_behavior": " Yes",
                    "answer_not_matching_behavior": " No",
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    config = tmp_path / "predictors.yaml"
    config.write_text(
        f"model: {model}\n"
        "datasets:\n"
        f"  - {{name: prefs, source: {prefs}, size: 6, max_length: 96, max_prompt_length: 64}}\n"
        f"  - {{name: persona, source: {persona}, kind: persona, persona_pairs: [[Y, N], [N, Y]]}}\n"
        "batch_size: 2\nbootstrap: 50\nprogress: false\n"
        "optimizer: {name: rmsprop, lr: 1.0e-3}\n"
        f"out_dir: {tmp_path / 'out'}\n"
    )
    assert cli.main(["predictors", "--config", str(config), "only=[persona]"]) == 0
    # the second piece reports both: persona from the first piece's record
    assert cli.main(["predictors", "--config", str(config), "only=[prefs]"]) == 0
    out = tmp_path / "out"
    result = json.loads((out / "results.json").read_text())
    assert sorted(result["datasets"]) == ["persona", "prefs"]
    for name in ("prefs", "persona"):
        assert (out / f"scatter_{name}.png").stat().st_size > 0
        d = result["datasets"][name]
        v = {k: np.array(x) for k, x in d["values"].items()}
        assert d["summary"]["pair_rate_below_zero"]["count"] == int((v["pair_rate"] < 0).sum())
        rho = d["statistics"]["measured_change"]["pair_rate"]["spearman"]
        assert rho["value"] == pytest.approx(
            scipy.stats.spearmanr(v["pair_rate"], v["measured_change"]).statistic
        )
        assert rho["ci95"][0] <= rho["value"] <= rho["ci95"][1]
        assert np.all(v["measured_change"] != 0)  # the epoch moved every ln π(y+)
    assert len(result["datasets"]["prefs"]["values"]["index"]) == 6
    # single-token responses share the prompt's state: CHES is 0 and has no correlation
    assert np.all(np.array(result["datasets"]["persona"]["values"]["ches"]) == 0)
    assert result["datasets"]["persona"]["statistics"]["pair_rate"]["ches"]["spearman"] == {
        "value": None,
        "ci95": [None, None],
    }
    check = result["datasets"]["persona"]["summary"]["theorem4"]
    assert check["max_rel_diff_head_rate_vs_closed_form"] < 1e-4
    table = (out / "table.md").read_text()
    assert "partial Spearman" in table and "persona: pair rate" in table
    assert "Weights: " in table  # where the weights came from
