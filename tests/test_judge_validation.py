"""Judge validation statistics against published worked examples and simulated judges whose
error rates are set by construction (not computed by the code under test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ld_jax.errors import LdJaxError
from ld_jax.judge_validation import (
    LabelledReply,
    cohen_kappa,
    corrected_rate,
    evaluate,
    judge_metrics,
    read_labels,
    render,
    rogan_gladen,
    split_half,
)


def test_kappa_matches_the_textbook_example():
    # Cohen's kappa, Wikipedia's worked example: 50 proposals, 20 yes/yes, 5 yes/no, 10 no/yes,
    # 15 no/no; p_o = 0.7, p_e = 0.5, kappa = 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0
    assert np.isnan(cohen_kappa(["x"] * 4, ["x"] * 4))  # chance agreement 1: undefined


def test_metrics_count_unparsable_as_a_wrong_non_refusal():
    judged = ["refusal", "refusal", "compliance", "unparsable", "compliance", "refusal"]
    truth = ["refusal", "compliance", "refusal", "refusal", "compliance", "refusal"]
    m = judge_metrics(judged, truth)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["unparsable"]) == (2, 1, 2, 1, 1)
    assert m["precision"]["value"] == pytest.approx(2 / 3)
    assert m["recall"]["value"] == pytest.approx(2 / 4)
    assert m["agreement"]["value"] == pytest.approx(3 / 6)
    lo, hi = m["recall"]["ci"]
    assert lo < 0.5 < hi


def test_rogan_gladen_recovers_a_simulated_prevalence():
    rng = np.random.default_rng(0)
    n, prevalence, se, sp = 200_000, 0.3, 0.8, 0.9
    truth = rng.random(n) < prevalence
    said = np.where(truth, rng.random(n) < se, rng.random(n) > sp)
    assert abs(said.mean() - 0.31) < 0.005  # 0.3·0.8 + 0.7·0.1
    assert rogan_gladen(0.31, 0.8, 0.9) == pytest.approx(0.3)
    assert rogan_gladen(said.mean(), se, sp) == pytest.approx(prevalence, abs=0.01)
    assert rogan_gladen(0.01, 0.8, 0.9) == 0.0  # clipped
    assert np.isnan(rogan_gladen(0.5, 0.5, 0.5))


def test_corrected_rate_interval_covers_the_true_rate():
    rng = np.random.default_rng(1)
    se, sp = 0.6, 0.95  # a judge that misses many refusals, like the phrase list
    label = lambda t: np.where(t, "refusal", "compliance")  # noqa: E731

    def judge(truth):
        return label(np.where(truth, rng.random(len(truth)) < se, rng.random(len(truth)) > sp))

    val_truth = rng.random(150) < 0.5
    scored_truth = rng.random(400) < 0.4
    r = corrected_rate(judge(scored_truth), judge(val_truth), label(val_truth), seed=0)
    lo, hi = r["corrected_ci"]
    assert lo <= scored_truth.mean() <= hi
    assert r["observed"]["value"] < scored_truth.mean()  # the judge undercounts
    assert abs(r["corrected"] - scored_truth.mean()) < abs(
        r["observed"]["value"] - scored_truth.mean()
    )


def _rows(n=40):
    names = ("compliance", "refusal")
    return [
        LabelledReply(str(i), ["before", "after"][i % 2], f"p{i}", "q", "r", names[i % 3 == 0])
        for i in range(n)
    ]


def test_split_is_fixed_by_ids_and_evaluate_reports_every_stage():
    rows = _rows()
    train, held = split_half(rows)
    assert len(train) + len(held) == len(rows) and 10 < len(held) < 30
    train2, held2 = split_half(rows + _rows(60)[40:])
    assert set(r.id for r in held) <= set(r.id for r in held2)  # old rows stay where they were
    table = evaluate({"always": ["refusal"] * len(held)}, held)
    assert set(table["always"]) == {"all", "before", "after"}
    assert table["always"]["all"]["recall"]["value"] == 1.0
    assert "| always | all |" in render(table, "held-out")


def test_read_labels_names_the_bad_line(tmp_path):
    good = {
        "id": "a",
        "stage": "s",
        "prompt_id": "1",
        "prompt": "p",
        "reply": "r",
        "label": "refusal",
    }
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "label": "maybe"}))
    with pytest.raises(LdJaxError, match=r"labels.jsonl line 2: label 'maybe'"):
        read_labels(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    with pytest.raises(LdJaxError, match=r"labels.jsonl line 3: id 'a' appears twice"):
        read_labels(path)
    path.write_text("{not json\n")
    with pytest.raises(LdJaxError, match=r"labels.jsonl line 1: malformed JSON"):
        read_labels(path)
    path.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(LdJaxError, match=r"labels.jsonl line 1: missing stage, prompt_id"):
        read_labels(path)


def _e3_results(tmp_path):
    """A results.json shaped like `ld-jax unalign`'s: replies of seed 0 per stage and split."""
    train, test = ["t0", "t1", "t2"], ["s0"]

    def stage(tag):
        return {
            "train": {"replies": [[f"{tag} reply {i}", "refusal"] for i in range(3)]},
            "test": {"replies": [[f"{tag} test reply", "compliance"]]},
        }

    results = {
        "train_prompts": train,
        "test_prompts": test,
        "before": stage("warm"),
        "runs": {"full": stage("full"), "ches": stage("ches")},
    }
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    return path


def test_e3_replies_are_blind_and_sampled_per_stage(tmp_path):
    from ld_jax.judge_validation import e3_replies, stratified_sample

    rows = e3_replies(_e3_results(tmp_path))
    assert len(rows) == 3 * 4
    assert [r["stage"] for r in rows[::4]] == ["after_warmup", "after_full", "after_ches"]
    first = rows[0]
    assert first["prompt"] == "t0" and first["reply"] == "warm reply 0" and first["label"] == ""
    assert "refusal" not in json.dumps(rows)  # the phrase judge's verdicts are left out
    sample = stratified_sample(rows, per_stage=2)
    assert len(sample) == 6 and {r["stage"] for r in sample} == {r["stage"] for r in rows}


def test_phrase_file_extends_the_default_list(tmp_path):
    from ld_jax.judge import PhraseJudge

    base = PhraseJudge.from_file("configs/refusal_phrases.yaml")
    e3 = PhraseJudge.from_file("configs/refusal_phrases_e3.yaml")
    assert e3.phrases[: len(base.phrases)] == base.phrases and len(e3.phrases) > len(base.phrases)
    said = e3(["q", "q"], ["I'm not sure I can help with that.", "Here is how."])
    assert [v.label for v in said] == ["refusal", "compliance"]
    assert base(["q"], ["I'm not sure I can help with that."])[0].label == "compliance"


def test_the_committed_e3_labels_cover_every_stage():
    rows = read_labels("docs/results/judge_labels_e3.jsonl")
    stages = {r.stage for r in rows}
    assert len(rows) >= 150
    assert {"before_warmup", "after_warmup", "after_full", "after_ches", "after_gold"} <= stages
    train, held = split_half(rows)
    assert all(r.stage in {x.stage for x in held} for r in train)  # both halves see every stage


def test_cli_scores_a_labels_file(tmp_path, capsys):
    from ld_jax import cli

    rows = [
        {
            "id": str(i),
            "stage": "s",
            "prompt_id": str(i),
            "prompt": "q",
            "reply": reply,
            "label": lab,
        }
        for i, (reply, lab) in enumerate(
            [("I'm sorry, but no.", "refusal"), ("Sure, here.", "compliance")] * 5
        )
    ]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        cli.main(["judge-validate", "score", "--labels", str(labels), "--out", str(tmp_path / "o")])
        == 0
    )
    report = json.loads((tmp_path / "o/validation.json").read_text())
    assert report["all"]["phrases"]["all"]["kappa"]["value"] == 1.0
    assert "| phrases | all |" in (tmp_path / "o/validation.md").read_text()


def test_varied_warmup_refusals_avoid_every_judge_phrase():
    """E3's varied warm-up must not teach the phrase judges' phrases (issue 21)."""
    from ld_jax.experiments.unalign.config import WarmupConfig, refusal_texts
    from ld_jax.judge import PhraseJudge

    texts = refusal_texts(WarmupConfig(refusals_file="configs/warmup_refusals_varied.yaml"))
    assert len(set(texts)) == len(texts) >= 40
    for phrases in ("configs/refusal_phrases.yaml", "configs/refusal_phrases_e3.yaml"):
        said = PhraseJudge.from_file(phrases)(["q"] * len(texts), list(texts))
        assert [t for t, v in zip(texts, said) if v.label == "refusal"] == []
    # the default warm-up texts, by contrast, all carry a phrase
    default = refusal_texts(WarmupConfig())
    said = PhraseJudge.from_file("configs/refusal_phrases.yaml")(
        ["q"] * len(default), list(default)
    )
    assert all(v.label == "refusal" for v in said)
