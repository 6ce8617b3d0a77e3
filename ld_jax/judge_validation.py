"""A refusal judge checked against hand labels, where E3 uses it (issue 21).

    rows = read_labels("docs/results/judge_labels_e3.jsonl")     # LabelledReply per line
    train, heldout = split_half(rows)                            # fixed by the ids
    table = evaluate({"phrases": verdict_labels}, heldout)       # per judge, per stage
    rate = corrected_rate(judged_scored, val_judged, val_truth)  # Rogan-Gladen, with intervals

A labels file is JSON lines with `id`, `stage`, `prompt_id`, `prompt`, `reply` and `label`
("refusal" or "compliance"). Refusal is the positive class. A judge's "unparsable" verdict is
kept as its own answer: it never counts as agreement, and for precision and recall it is a
non-refusal (what a refusal-rate count does with it).

Intervals: Wilson for precision, recall, specificity and agreement (counts); the percentile
bootstrap over labelled replies for Cohen's kappa and over both the labels and the scored
replies for a corrected rate.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ld_jax.errors import LdJaxError
from ld_jax.report import markdown_table
from ld_jax.stats import bootstrap, wilson

LABELS = ("refusal", "compliance")
FIELDS = ("id", "stage", "prompt_id", "prompt", "reply", "label")


@dataclass(frozen=True)
class LabelledReply:
    id: str
    stage: str  # e.g. "before_warmup", "after_warmup", "after_full", "after_ches"
    prompt_id: str
    prompt: str
    reply: str
    label: str  # one of LABELS


def e3_replies(results_path: str | Path) -> list[dict]:
    """Every reply an E3 run (`ld-jax unalign`) kept, seed 0 of each stage, as unlabelled rows:
    the warmed model before DPO ("after_warmup") and each condition after it, train and test
    prompts. The phrase judge's verdict is left out, so that labelling is blind to it."""
    path = Path(results_path)
    results = json.loads(path.read_text())
    prompts = {"train": results["train_prompts"], "test": results["test_prompts"]}
    stages = {"after_warmup": results["before"]}
    stages.update({f"after_{name}": run for name, run in results["runs"].items()})
    rows = []
    for stage, record in stages.items():
        for split, texts in prompts.items():
            replies = record[split]["replies"]
            if len(replies) != len(texts):
                raise LdJaxError(
                    f"{path}: {stage}/{split} has {len(replies)} replies for {len(texts)} prompts"
                )
            for i, ((reply, _verdict), prompt) in enumerate(zip(replies, texts)):
                rows.append(
                    {
                        "id": f"{path.parent.name}/{stage}/{split}/{i}",
                        "stage": stage,
                        "split": split,
                        "prompt_id": f"{split}/{i}",
                        "prompt": prompt,
                        "reply": reply,
                        "label": "",
                    }
                )
    return rows


def stratified_sample(rows: Sequence[dict], per_stage: int, seed: int = 0) -> list[dict]:
    """`per_stage` rows drawn at random from each stage (all of a smaller one), in stage order."""
    rng = np.random.default_rng(seed)
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        pool = [r for r in rows if r["stage"] == stage]
        take = rng.choice(len(pool), min(per_stage, len(pool)), replace=False)
        out += [pool[i] for i in sorted(take)]
    return out


def read_labels(path: str | Path) -> list[LabelledReply]:
    """The labels file; a malformed line is an error that names it. Ids must be unique."""
    from ld_jax.data.preference import read_rows

    if not Path(path).is_file():
        raise LdJaxError(f"labels file not found: {path}")
    rows, seen = [], set()
    for _, record, where in read_rows(str(path)):
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise LdJaxError(f"{where}: missing {', '.join(missing)}")
        if record["label"] not in LABELS:
            raise LdJaxError(f"{where}: label {record['label']!r} is not one of {LABELS}")
        row = LabelledReply(**{f: str(record[f]) for f in FIELDS})
        if row.id in seen:
            raise LdJaxError(f"{where}: id {row.id!r} appears twice")
        seen.add(row.id)
        rows.append(row)
    if not rows:
        raise LdJaxError(f"{path}: no labelled replies")
    return rows


def split_half(rows: Sequence[LabelledReply]) -> tuple[list[LabelledReply], list[LabelledReply]]:
    """(train, held-out): each row by the parity of a hash of its id, so about half of every
    stage on each side, and adding rows later never moves an old one to the other half."""
    train, heldout = [], []
    for row in rows:
        side = int(hashlib.sha256(row.id.encode()).hexdigest(), 16) % 2
        (heldout if side else train).append(row)
    return train, heldout


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters over the same items, any set of categories; nan when the
    chance agreement is 1 (both raters give one category throughout)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b) or len(a) == 0:
        raise LdJaxError(f"kappa needs two equal non-empty label lists ({len(a)} and {len(b)})")
    observed = float(np.mean(a == b))
    chance = sum(float(np.mean(a == c) * np.mean(b == c)) for c in np.union1d(a, b))
    return float("nan") if chance == 1 else (observed - chance) / (1 - chance)


def _interval(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "k": k, "n": n, "ci": [lo, hi]}


def judge_metrics(judged: Sequence[str], truth: Sequence[str], seed: int = 0) -> dict:
    """One judge's verdicts against the labels: confusion counts, precision, recall,
    specificity and agreement (Wilson), Cohen's kappa (bootstrap over replies)."""
    if len(judged) != len(truth):
        raise LdJaxError(f"{len(judged)} verdicts for {len(truth)} labels")
    j, t = np.asarray(judged), np.asarray(truth)
    said, real = j == "refusal", t == "refusal"
    tp, fp = int(np.sum(said & real)), int(np.sum(said & ~real))
    fn, tn = int(np.sum(~said & real)), int(np.sum(~said & ~real))
    kappa = cohen_kappa(j, t)
    with warnings.catch_warnings():  # one-class strata: every resample's kappa is undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa_ci = list(bootstrap(cohen_kappa, j, t, seed=seed))
    return {
        "n": len(t),
        "refusals": int(real.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "unparsable": int(np.sum(j == "unparsable")),
        "precision": _interval(tp, tp + fp),
        "recall": _interval(tp, tp + fn),
        "specificity": _interval(tn, tn + fp),
        "agreement": _interval(int(np.sum(j == t)), len(t)),
        "kappa": {"value": kappa, "ci": kappa_ci},
    }


def evaluate(verdicts: dict[str, Sequence[str]], rows: Sequence[LabelledReply]) -> dict:
    """{judge: {stage: metrics, "all": metrics}} for each judge's verdicts on `rows` (in order)."""
    stages = sorted({r.stage for r in rows})
    out = {}
    for name, judged in verdicts.items():
        if len(judged) != len(rows):
            raise LdJaxError(f"judge {name}: {len(judged)} verdicts for {len(rows)} rows")
        judged = np.asarray(judged)
        truth = np.asarray([r.label for r in rows])
        per = {"all": judge_metrics(judged, truth)}
        for stage in stages:
            mask = np.asarray([r.stage == stage for r in rows])
            per[stage] = judge_metrics(judged[mask], truth[mask])
        out[name] = per
    return out


def rogan_gladen(observed: float, sensitivity: float, specificity: float) -> float:
    """The true prevalence from an imperfect test's observed rate (Rogan & Gladen 1978):
    (q + Sp − 1) / (Se + Sp − 1), clipped to [0, 1]; nan when Se + Sp ≤ 1 (no information)."""
    youden = sensitivity + specificity - 1
    if youden <= 0:
        return float("nan")
    return float(np.clip((observed + specificity - 1) / youden, 0.0, 1.0))


def corrected_rate(
    scored: Sequence[str],
    val_judged: Sequence[str],
    val_truth: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """A judge's refusal rate over `scored` verdicts, and that rate corrected by the judge's
    sensitivity and specificity on the labelled replies (`val_*`). The interval resamples the
    scored replies and the labelled ones independently, so it carries both uncertainties."""
    scored = np.asarray(scored) == "refusal"
    said = np.asarray(val_judged) == "refusal"
    real = np.asarray(val_truth) == "refusal"
    if not real.any() or real.all():
        raise LdJaxError("the labelled replies need both refusals and compliances")

    def corrected(s, j, t):
        se = np.mean(j[t]) if t.any() else np.nan
        sp = np.mean(~j[~t]) if (~t).any() else np.nan
        return rogan_gladen(float(np.mean(s)), float(se), float(sp))

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        s = scored[rng.integers(0, len(scored), len(scored))]
        rows = rng.integers(0, len(real), len(real))
        draws.append(corrected(s, said[rows], real[rows]))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    k = int(scored.sum())
    return {
        "observed": _interval(k, len(scored)),
        "sensitivity": float(np.mean(said[real])),
        "specificity": float(np.mean(~said[~real])),
        "corrected": corrected(scored, said, real),
        "corrected_ci": [float(lo), float(hi)],
    }


def _interval_cell(value: float | None, ci) -> str:
    if value is None or np.isnan(value):
        return "–"
    lo, hi = (c + 0.0 for c in ci)  # no "-0.00"
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def render(table: dict, title: str) -> str:
    """The per-judge, per-stage table as Markdown."""

    def cell(m):
        return _interval_cell(m["value"], m["ci"])

    header = ["judge", "stage", "n", "refusals", "precision", "recall", "agreement", "Cohen's κ"]
    rows = [
        [name, stage, m["n"], m["refusals"], cell(m["precision"]), cell(m["recall"])]
        + [cell(m["agreement"]), cell(m["kappa"])]
        for name, per in table.items()
        for stage, m in per.items()
    ]
    return f"### {title}\n\n" + markdown_table(header, rows, "llrrllll")


def _build(spec: str):
    from ld_jax import judge
    from ld_jax.config import load_config

    if spec == "phrases" or spec.startswith("phrases:"):
        cfg = judge.JudgeConfig(**({"phrases_file": spec[8:]} if ":" in spec else {}))
    else:
        cfg = load_config(judge.JudgeConfig, spec)
    return judge.build_judge(cfg)


def corrected_e3_rates(results_path, judge_fn, val_judged, val_truth) -> dict:
    """{stage: {split: corrected_rate(...)}} for the replies an E3 run kept (`e3_replies`),
    judged again by `judge_fn` and corrected by its errors on the labelled replies."""
    rows = e3_replies(results_path)
    said = judge_fn([r["prompt"] for r in rows], [r["reply"] for r in rows])
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        out[stage] = {}
        for split in ("train", "test"):
            scored = [
                v.label for r, v in zip(rows, said) if (r["stage"], r["split"]) == (stage, split)
            ]
            out[stage][split] = corrected_rate(scored, val_judged, val_truth)
    return out


def render_corrected(rates: dict, judge_name: str) -> str:
    header = ["stage", "split", "n", "observed [Wilson 95%]", "corrected [bootstrap 95%]"]
    rows = [
        [stage, split, r["observed"]["n"]]
        + [_interval_cell(r["observed"]["value"], r["observed"]["ci"])]
        + [_interval_cell(r["corrected"], r["corrected_ci"])]
        for stage, per in rates.items()
        for split, r in per.items()
    ]
    title = f"### E3 refusal rates judged by {judge_name}, corrected (Rogan–Gladen)"
    return f"{title}\n\n" + markdown_table(header, rows, "llrll")


def score_judges(
    labels_path: str | Path,
    judges: dict[str, str],
    out_dir: str | Path,
    results_path: str | Path | None = None,
) -> str:
    """Run each judge (name -> "phrases", "phrases:PHRASES.yaml" or a JudgeConfig YAML file) on
    every labelled reply and
    write `validation.json` and `validation.md` to `out_dir`: per judge and stage, on the
    training half, the held-out half and all rows. Returns the held-out table."""
    from ld_jax import files

    rows = read_labels(labels_path)
    train, heldout = split_half(rows)
    verdicts, raw = {}, {}
    for name, spec in judges.items():
        said = _build(spec)([r.prompt for r in rows], [r.reply for r in rows])
        verdicts[name] = {r.id: v.label for r, v in zip(rows, said)}
        raw[name] = {r.id: v.raw for r, v in zip(rows, said)}  # what the judge said

    def table(part):
        return evaluate({n: [v[r.id] for r in part] for n, v in verdicts.items()}, part)

    result = {
        "labels": str(labels_path),
        "judges": judges,
        "counts": {"all": len(rows), "train": len(train), "heldout": len(heldout)},
        "heldout": table(heldout),
        "train": table(train),
        "all": table(rows),
        "verdicts": verdicts,
        "raw": raw,
    }
    md = "\n".join(
        render(result[part], f"{part} ({result['counts'][part]} replies)")
        for part in ("heldout", "train", "all")
    )
    if results_path is not None:
        # the best judge by held-out kappa; its errors measured on the held-out half only
        best = max(
            judges,
            key=lambda n: np.nan_to_num(result["heldout"][n]["all"]["kappa"]["value"], nan=-1),
        )
        truth = [r.label for r in heldout]
        judged = [verdicts[best][r.id] for r in heldout]
        rates = corrected_e3_rates(results_path, _build(judges[best]), judged, truth)
        result["e3_corrected"] = {"results": str(results_path), "judge": best, "rates": rates}
        md += "\n" + render_corrected(rates, best)
    out = Path(out_dir)
    files.write_json(out / "validation.json", result)
    files.write_text(out / "validation.md", md)
    return render(result["heldout"], f"held-out ({len(heldout)} replies)")
