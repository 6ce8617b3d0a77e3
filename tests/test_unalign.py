"""E3 (`ld-jax unalign`) on a tiny random Llama with a character tokenizer and a pluggable
rule-based judge: the data stage is deterministic by seed, the judge is pluggable, the split
never leaks a prompt, the CHES filter keeps exactly the lowest fraction, and bad prompts and
unparsable verdicts are counted, never silently dropped."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import (
    save_tiny_llama,  # noqa: E402
    tiny_tokenizer,  # noqa: E402
)

from ld_jax import ches, cli, judge, models  # noqa: E402
from ld_jax.config import load_config  # noqa: E402
from ld_jax.experiments import (
    protocol,  # noqa: E402
    unalign,  # noqa: E402
)
from ld_jax.experiments.unalign import onpolicy as data  # noqa: E402
from ld_jax.experiments.unalign import run as unalign_run  # noqa: E402

HH = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def rule_label(text: str) -> str:
    """The test judge: a fixed function of the reply text, so every verdict can be recomputed."""
    s = sum(map(ord, text))
    return "unparsable" if s % 5 == 0 else ("refusal" if s % 2 == 0 else "compliance")


def rule_judge(cfg):
    return lambda prompts, responses: [judge.Verdict(rule_label(r), "rule") for r in responses]


judge.register("test_rule", rule_judge)


def _prompt_file(path):
    rows = [{"turns": [f"How do I do thing number {i}?"]} for i in range(30)]
    rows += [
        {"turns": [""]},
        {"turns": ["   "]},
        {"turns": ["x" * 300]},
        {"turns": [rows[0]["turns"][0]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("e3")
    return str(save_tiny_llama(root / "model", tokenizer=tiny_tokenizer(markers=False))), root


def _overrides(model_dir, root, *extra):
    return [
        f"model={model_dir}",
        f"prompts.source={_prompt_file(root / 'prompts.jsonl')}",
        "prompts.format=jsonl",
        "prompts.max_prompt_tokens=80",
        "n_prompts=20",
        "warmup.n_prompts=6",
        "warmup.eval_prompts=4",
        "warmup.max_rounds=1",
        "warmup.steps_per_round=2",
        "warmup.batch_size=2",
        "warmup.lr=1e-3",
        "max_new_tokens=8",
        "sample_batch_size=8",
        "eval.max_new_tokens=8",
        "eval.batch_size=8",
        "eval.seeds=[0,1]",
        "judge.kind=test_rule",
        "batch_size=4",
        "optimizer.lr=1e-3",
        "sft_lambdas=[0.1,1.0]",
        "ches_fraction=0.25",
        f"cache_dir={root / 'cache'}",
        "progress=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(tiny):
    model_dir, root = tiny
    out = root / "out"
    assert (
        cli.main(
            [
                "unalign",
                "--config",
                "configs/unalign_smollm2.yaml",
                *_overrides(model_dir, root, f"out_dir={out}"),
            ]
        )
        == 0
    )
    return json.loads((out / "results.json").read_text()), out


def test_outputs_and_bad_prompts_are_counted(run):
    result, out = run
    for name in ("table.md", "pair_types.md", "examples.md", "figure3.png", "figure4.png"):
        assert (out / name).stat().st_size > 0
    assert "Weights: " in (out / "table.md").read_text()  # where the weights came from
    counts = result["prompt_counts"]
    assert (counts["empty"], counts["too_long"], counts["duplicate"]) == (2, 1, 1)
    assert counts["usable"] == 30 and counts["experiment"] == 20 and counts["warm_up"] == 10
    # gold: the jsonl has none
    assert set(result["runs"]) == {"full", "sft_0.1", "sft_1", "ches", "ches_equal_updates"}
    assert result["warmup"]["rounds"][-1]["steps"] == 2
    assert all(len(r["train"]["rates"]) == 2 for r in result["runs"].values())
    by_type = (out / "pair_types.md").read_text().split("by pair type")[1]
    assert sum(
        int(line.split("|")[2])
        for line in by_type.splitlines()
        if line.startswith("| ") and "/" in line
    ) == len(result["train_pairs"])


def test_ches_subset_repeated_for_as_many_updates_as_the_full_data(run):
    runs = run[0]["runs"]
    ches, equal, full = runs["ches"], runs["ches_equal_updates"], runs["full"]
    assert sorted(equal["pair_indices"]) == sorted(ches["pair_indices"])
    assert ches["steps"] < full["steps"] <= equal["steps"] < full["steps"] + ches["steps"]
    assert equal["epochs"] * ches["steps"] == equal["steps"]


def test_split_never_leaks_prompts(run):
    result, _ = run
    train, test = set(result["train_prompts"]), set(result["test_prompts"])
    assert not train & test
    assert len(train) + len(test) == 20 and len(test) == 3  # round(0.15 * 20)
    assert {p["prompt"] for p in result["train_pairs"]} <= train


def test_judge_is_pluggable_and_unparsable_pairs_are_counted(run, tiny):
    result, _ = run
    for p in result["train_pairs"]:  # verdicts of the stored texts follow the plugged-in rule
        a, b = rule_label(p["chosen"]), rule_label(p["rejected"])
        assert data.pair_type(a, b) == p["type"]
        if a != b:
            assert a == "refusal"  # the refusal is the preferred reply
    assert sum(result["pair_types"].values()) == len(result["train_pairs"])
    samples = next((tiny[1] / "cache").glob("samples-*.json"))
    labels = json.loads(samples.read_text())["labels"]
    assert result["pair_counts"].get("unparsable", 0) == sum(
        "unparsable" in pair for pair in labels
    )


def test_ches_filter_keeps_exactly_the_lowest_fraction(run):
    result, _ = run
    scores = np.asarray(result["ches"]["ln_ches"])
    k = max(1, round(0.25 * len(scores)))
    assert sorted(result["ches"]["kept"]) == sorted(np.argsort(scores, kind="stable")[:k].tolist())
    assert result["runs"]["ches"]["pairs"] == k
    assert max(scores[result["ches"]["kept"]]) <= min(np.delete(scores, result["ches"]["kept"]))
    rng = np.random.default_rng(0)
    for n, frac in [(7, 0.05), (100, 0.05), (101, 0.15), (40, 1.0)]:
        v = rng.normal(size=n)
        kept = data.lowest_fraction(v, frac)
        assert len(kept) == max(1, round(frac * n)) and set(kept) == set(np.argsort(v)[: len(kept)])


def test_data_stage_is_deterministic_by_seed(tiny, tmp_path):
    model_dir, root = tiny
    cfg = load_config(
        unalign.UnalignConfig, "configs/unalign_smollm2.yaml", _overrides(model_dir, root)
    )
    lm = models.from_pretrained(model_dir)
    prompts, _ = data.read_prompts(cfg.prompts, lambda t: len(t))
    exp, _ = data.choose_prompts(prompts, 8, 0, cfg.seed, need_gold=False)
    fn = judge.build_judge(cfg.judge)
    log = protocol.Log("test", enabled=False)

    def samples(name, **change):
        return unalign_run.build_data(
            dataclasses.replace(cfg, cache_dir=str(tmp_path / name), **change),
            lm,
            exp,
            fn,
            "k",
            log,
        )

    first, again, other = (
        samples("a")["samples"],
        samples("b")["samples"],
        samples("c", seed=1)["samples"],
    )
    assert first == again and first != other
    labels = [[rule_label(a), rule_label(b)] for a, b in first]
    pairs_a, _ = data.build_pairs(exp, first, labels, seed=0)
    pairs_b, _ = data.build_pairs(exp, first, labels, seed=0)
    assert pairs_a == pairs_b


def test_pair_rule_tie_break_and_gold_prompts():
    prompts = [data.UnsafePrompt(i, f"p{i}") for i in range(4)]
    responses = [["a", "b"], ["c", "d"], ["e", "e"], ["f", "g"]]
    labels = [
        ["compliance", "refusal"],
        ["refusal", "refusal"],
        ["refusal", "refusal"],
        ["unparsable", "refusal"],
    ]
    pairs, counts = data.build_pairs(
        prompts, responses, labels, seed=0, tie_scores=[None, (0.0, 1.0), None, None]
    )
    assert counts == {"identical": 1, "unparsable": 1}
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].tie) == ("b", "a", False)
    assert (pairs[1].chosen, pairs[1].tie, pairs[1].pair_type) == ("d", True, "refusal/refusal")
    hh, counts = data.read_prompts(data.PromptsConfig(source=HH, max_prompt_tokens=10**6), len)
    assert len(hh) + sum(counts.values()) == 2312
    exp, warm = data.choose_prompts(hh, 50, 200, seed=0, need_gold=True)
    assert all(p.gold for p in exp) and not {p.text for p in exp} & {p.text for p in warm}
    assert all(r.chosen and r.rejected for r in data.gold_records(exp))


def test_ches_scores_of_the_run_match_an_independent_call(run, tiny):
    """The filter ranks the scores of the very token ids that are trained on."""
    result, _ = run
    lm = models.from_pretrained(tiny[0])
    cfg = load_config(
        unalign.UnalignConfig, "configs/unalign_smollm2.yaml", _overrides(tiny[0], tiny[1])
    )
    warm = next((tiny[1] / "cache").glob("warmup-*/params.safetensors"))
    lm = dataclasses.replace(lm, params=models.loading.load_param_tree(warm))
    records = data.as_records(
        [
            data.OnPolicyPair(
                data.UnsafePrompt(i, p["prompt"]),
                p["chosen"],
                p["rejected"],
                "refusal",
                "refusal",
                True,
            )
            for i, p in enumerate(result["train_pairs"])
        ]
    )
    pairs, _ = unalign_run.tokenize(cfg, lm.tokenizer, records)
    scores = ches.ches_scores(
        lm,
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
    )
    np.testing.assert_allclose(scores["ln_ches"], result["ches"]["ln_ches"], rtol=1e-5, atol=1e-5)
    (cached,) = (tiny[1] / "cache").glob(
        "ches-*.npz"
    )  # what a re-run reads instead of scoring again
    np.testing.assert_array_equal(
        np.load(cached)["ln_ches"].astype(np.float64), result["ches"]["ln_ches"]
    )


def test_a_seed_with_only_unparsable_verdicts_gives_nan_not_a_crash(tiny):
    model_dir, root = tiny
    cfg = load_config(
        unalign.UnalignConfig, "configs/unalign_smollm2.yaml", _overrides(model_dir, root)
    )
    lm = models.from_pretrained(model_dir)
    never = lambda prompts, responses: [judge.Verdict("unparsable", "?") for _ in responses]  # noqa: E731
    out = unalign_run.refusal_rates(
        cfg, lm, [data.UnsafePrompt(0, "hi?")], never, (0,), "all unparsable", protocol.Log("t")
    )
    assert np.isnan(out["rates"][0]) and out["unparsable"] == [1]


def test_gold_gets_its_own_lr_search(tiny):
    """HH prompts have gold pairs; with an lr grid, gold is searched by the same rule as the
    full data, and each search is kept in results.json."""
    model_dir, root = tiny
    out = root / "out_gold"
    args = _overrides(model_dir, root, f"out_dir={out}", f"cache_dir={root / 'cache_gold'}")
    args = [a for a in args if not a.startswith(("prompts.", "n_prompts"))]
    args += [
        f"prompts.source={HH}",
        "prompts.format=hh",
        "prompts.max_prompt_tokens=60",
        "n_prompts=12",
        "warmup.enabled=false",
        "conditions=[full,gold]",
        "lr_grid=[1e-3,1e-4]",
        "eval.seeds=[0]",
    ]
    assert cli.main(["unalign", "--config", "configs/unalign_smollm2.yaml", *args]) == 0
    result = json.loads((out / "results.json").read_text())
    gold = result["runs"]["gold"]
    assert [t["lr"] for t in gold["lr_search"]][0] == 1e-3  # the largest lr is tried first
    stable = [t["lr"] for t in gold["lr_search"] if t["stable"]]
    assert gold["lr"] == (stable[0] if stable else result["lr"])
    assert result["lr_search"] and result["lr"] in (1e-3, 1e-4)


def test_every_rate_has_per_prompt_verdicts_and_a_prompt_bootstrap(run):
    result, _ = run
    for record in [result["before"], *result["runs"].values()]:
        for split in ("train", "test"):
            r = record[split]
            for rate, row in zip(r["rates"], r["refused"]):
                parsable = [x for x in row if x is not None]
                assert rate == pytest.approx(np.mean(parsable) if parsable else np.nan, nan_ok=True)
            lo, hi = r["bootstrap95"]
            if np.isfinite(r["mean"]):
                assert lo <= r["mean"] + 1e-12 and r["mean"] <= hi + 1e-12


def test_every_reported_condition_runs_once_per_training_seed(tiny):
    """train_seeds=2: full and CHES run again with loop seed 1 on the same pairs and lr; the
    seed summary averages the two runs and its interval resamples prompts over both."""
    model_dir, root = tiny
    out = root / "out_seeds"
    args = _overrides(model_dir, root, f"out_dir={out}", "conditions=[full,ches]", "train_seeds=2")
    assert cli.main(["unalign", "--config", "configs/unalign_smollm2.yaml", *args]) == 0
    result = json.loads((out / "results.json").read_text())
    seeds = result["training_seeds"]
    assert set(seeds) == {"full", "ches"}
    for cond, summary in seeds.items():
        first = result["runs"][cond]
        again = json.loads((out / "runs" / f"{first['name']}_seed1.json").read_text())
        assert (first["seed"], again["seed"]) == (0, 1) and summary["seeds"] == [0, 1]
        assert sorted(again["pair_indices"]) == sorted(first["pair_indices"])
        assert (again["lr"], again["steps"]) == (first["lr"], first["steps"])
        for split in ("train", "test"):
            assert summary[split]["rates"] == [first[split]["mean"], again[split]["mean"]]
            assert summary[split]["mean"] == pytest.approx(np.mean(summary[split]["rates"]))
        assert summary["logp_chosen_change"] == [
            first["logp_chosen_change"],
            again["logp_chosen_change"],
        ]
    # a different order of the pairs trains a different model
    full = seeds["full"]["logp_chosen_change"]
    assert full[0] != full[1]
    assert "Over training seeds" in (out / "table.md").read_text()
