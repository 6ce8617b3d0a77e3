"""`ld-jax predictors`' statistics and outputs: per dataset × predictor × target, Spearman ρ,
partial Spearman controlling for |y+| and |y−|, and AUROC of the predictor for "target < 0",
each with a percentile-bootstrap 95% interval over samples; table.md, the scatter PNGs and
the results.json dict."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.stats

from ld_jax import files, stats
from ld_jax.experiments.predictors.config import PREDICTORS, TARGETS
from ld_jax.models.pull import weights_note
from ld_jax.report import format_number, markdown_table

LABELS = {
    "ches": "CHES",
    "ln_ches": "ln-CHES",
    "edit_distance": "edit distance",
    "last_hidden_ip": "last-hidden IP",
    "grad_cosine": "gradient cosine",
    "len_chosen": "|y+|",
    "len_rejected": "|y−|",
    "len_diff": "|y+| − |y−|",
    "pair_rate": "pair rate",
    "dataset_rate": "dataset rate",
    "measured_change": "Δ ln π(y+) after 1 epoch",
}
STATISTICS = ("spearman", "partial_spearman", "auroc")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ; nan when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(scipy.stats.spearmanr(x, y).statistic)


def partial_spearman(x: np.ndarray, y: np.ndarray, *controls: np.ndarray) -> float:
    """Spearman ρ of x and y controlling for `controls`: the Pearson correlation of the ranks
    of x and y after each is regressed (least squares, with an intercept) on the controls'
    ranks. Constant controls drop out of the regression; nan when x or y is constant."""
    rank = scipy.stats.rankdata
    design = np.column_stack([np.ones(len(x)), *(rank(c) for c in controls if np.ptp(c) > 0)])

    def residual(v):
        r = rank(v)
        return r - design @ np.linalg.lstsq(design, r, rcond=None)[0]

    rx, ry = residual(x), residual(y)
    if np.allclose(rx, 0) or np.allclose(ry, 0):
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) (ties count half), the Mann–Whitney U over
    n+·n−; nan without both classes. 0.5 is chance; below 0.5 the order is reversed."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = scipy.stats.rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def statistic_with_interval(name: str, x, y, lc, lr, cfg) -> dict:
    """One statistic of predictor x against target y, with its bootstrap 95% interval."""
    fns = {
        "spearman": lambda x, y, lc, lr: spearman(x, y),
        "partial_spearman": lambda x, y, lc, lr: partial_spearman(x, y, lc, lr),
        "auroc": lambda x, y, lc, lr: auroc(x, y < 0),
    }
    fn = fns[name]
    value = fn(x, y, lc, lr)
    if math.isnan(value):
        return {"value": None, "ci95": [None, None]}
    lo, hi = stats.bootstrap(fn, x, y, lc, lr, n_resamples=cfg.bootstrap, seed=cfg.seed)
    return {"value": value, "ci95": [lo, hi]}


def dataset_statistics(cfg, values: dict[str, np.ndarray]) -> dict:
    """{target: {predictor: {statistic: {value, ci95}}}} of one dataset."""
    lc, lr = values["len_chosen"], values["len_rejected"]
    out = {}
    for target in TARGETS:
        out[target] = {}
        for predictor in PREDICTORS:
            if predictor == target:
                continue
            x, y = values[predictor], values[target]
            out[target][predictor] = {
                s: statistic_with_interval(s, x, y, lc, lr, cfg) for s in STATISTICS
            }
    return out


def summary(values: dict[str, np.ndarray]) -> dict:
    """Counts of displacement per target (Wilson 95%), and for Persona the agreement of the
    head-restricted rate with Theorem 4's closed form."""
    n = len(values["index"])
    out = {"pairs": n}
    for target in TARGETS:
        k = int((values[target] < 0).sum())
        out[f"{target}_below_zero"] = {
            "count": k,
            "fraction": k / n,
            "wilson95": stats.wilson(k, n),
        }
        out[f"{target}_quantiles"] = np.quantile(values[target], [0, 0.25, 0.5, 0.75, 1]).tolist()
    out["sign_agreement_dataset_vs_measured"] = float(
        np.mean(np.sign(values["dataset_rate"]) == np.sign(values["measured_change"]))
    )
    if "head_rate" in values:
        head, closed = values["head_rate"], values["theorem4_inner"]
        out["theorem4"] = {
            "max_rel_diff_head_rate_vs_closed_form": float(
                np.max(np.abs(head - closed) / np.abs(closed))
            ),
            "head_share_of_pair_rate_median": float(np.median(head / values["pair_rate"])),
            "spearman_head_vs_full_rate": spearman(head, values["pair_rate"]),
        }
    return out


def cell(entry: dict) -> str:
    if entry["value"] is None:
        return "–"
    lo, hi = entry["ci95"]
    return f"{format_number(entry['value'])} [{format_number(lo)}, {format_number(hi)}]"


def tables(result: dict) -> str:
    """One Markdown table per statistic: predictor × (dataset, target)."""
    columns = [(d, t) for d in result["datasets"] for t in TARGETS]
    text = []
    for s in STATISTICS:
        header = ["predictor"] + [f"{d}: {LABELS[t]}" for d, t in columns]
        rows = []
        for p in PREDICTORS:
            row = [LABELS[p]]
            for d, t in columns:
                entry = result["datasets"][d]["statistics"][t].get(p)
                row.append("·" if entry is None else cell(entry[s]))
            rows.append(row)
        title = {
            "spearman": "Spearman ρ",
            "partial_spearman": "partial Spearman ρ (controlling for |y+| and |y−|)",
            "auroc": "AUROC for target < 0",
        }[s]
        text.append(f"### {title}\n\n" + markdown_table(header, rows, "l" + "r" * len(columns)))
    return "\n".join(text)


def scatter(path: Path, name: str, values: dict[str, np.ndarray]) -> Path:
    """Pair rate against CHES and ln-CHES for one dataset (symlog y: rates span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("ches", "ln_ches")):
        y = values["pair_rate"]
        ax.scatter(values[key], y, s=8, c=np.where(y < 0, "tab:red", "tab:blue"), alpha=0.7)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=max(1e-3, float(np.median(np.abs(y))) / 10))
        ax.set_xlabel(LABELS[key])
        ax.set_ylabel("⟨g+, g+ − g−⟩ (pair rate)")
        rho = spearman(values[key], y)
        ax.set_title(f"{name}: n={len(y)}, Spearman ρ={format_number(rho)}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)
    return path


def write_outputs(cfg, done: dict, out: Path) -> dict:
    """results.json's dict; writes table.md and `scatter_<dataset>.png` into `out`."""
    result = {"model": cfg.model, "title": cfg.title or cfg.model, "datasets": {}}
    result["protocol"] = {
        "loss": cfg.loss,
        "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "bootstrap": cfg.bootstrap,
        "rate_layout": cfg.rate_layout,
    }
    for name, record in done.items():
        values = record["values"]
        result["datasets"][name] = {
            "info": record["info"],
            "summary": summary(values),
            "statistics": dataset_statistics(cfg, values),
            "values": {k: v.tolist() for k, v in values.items()},
        }
        scatter(out / f"scatter_{name}.png", name, values)
    result["table_md"] = f"{tables(result).rstrip()}\n\n{weights_note(cfg.model)}\n"
    files.write_text(out / "table.md", result["table_md"])
    return result
