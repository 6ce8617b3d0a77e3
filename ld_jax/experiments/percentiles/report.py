"""E2's outputs from its finished runs: results.json data, table.md, figure2.png (paper Figure 2),
the Spearman correlations, and samples.md (paper Tables 14/15)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.stats

from ld_jax import files, report
from ld_jax.models.pull import weights_note
from ld_jax.report import format_number, markdown_table

LABELS = {
    "ches": "CHES",
    "ln_ches": "length-normalised CHES",
    "edit_distance": "edit distance",
    "last_hidden_ip": "last hidden embedding inner product",
}


def aggregate(cfg, recs: list[dict]) -> dict[str, dict]:
    """measure -> {percentiles, and per percentile over seeds: mean, min and max of the changes
    of the window's mean ln π(y+|x) (`chosen`) and ln π(y−|x) (`rejected`)}."""
    out = {}
    for m in cfg.measures:
        rows = {
            k: []
            for k in (
                "chosen_mean",
                "chosen_min",
                "chosen_max",
                "rejected_mean",
                "rejected_min",
                "rejected_max",
                "displaced",
                "loss_init",
                "loss_final",
            )
        }
        for p in cfg.percentiles:
            runs = [r for r in recs if r["measure"] == m and r["percentile"] == p]
            c = np.array([r["mean_chosen_logp_change"] for r in runs])
            j = np.array([r["mean_rejected_logp_change"] for r in runs])
            for name, v in (("chosen", c), ("rejected", j)):
                rows[f"{name}_mean"].append(float(v.mean()))
                rows[f"{name}_min"].append(float(v.min()))
                rows[f"{name}_max"].append(float(v.max()))
            rows["displaced"].append(float(np.mean([r["fraction_pairs_displaced"] for r in runs])))
            rows["loss_init"].append(float(np.mean([r["loss_init"] for r in runs])))
            rows["loss_final"].append(float(np.mean([r["loss_final"] for r in runs])))
        out[m] = {"percentiles": list(cfg.percentiles), **rows}
    return out


def spearman(cfg, agg: dict, recs: list[dict]) -> dict[str, dict]:
    """Per measure, Spearman ρ between the percentile and the displacement −Δ mean ln π(y+|x):
    over the seed means (`means`, one point per percentile) and over all runs (`runs`).
    ρ = 1 means the displacement order is the percentile order (the paper's finding for CHES)."""
    out = {}
    for m in cfg.measures:
        pts = [(r["percentile"], -r["mean_chosen_logp_change"]) for r in recs if r["measure"] == m]
        x, y = np.array(pts).T
        rho_means = _rho(cfg.percentiles, -np.asarray(agg[m]["chosen_mean"]))
        out[m] = {"means": rho_means, "runs": _rho(x, y)}
    return out


def _rho(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(scipy.stats.spearmanr(x, y).statistic)


def _cell(mean: float, lo: float, hi: float) -> str:
    return f"{format_number(mean, 3)} [{format_number(lo, 3)}, {format_number(hi, 3)}]"


def table(cfg, meta: dict, scores, wins, agg, rho) -> str:
    header = [
        "measure",
        "percentile",
        "window scores (min – max)",
        "Δ mean ln π(y+) [min, max]",
        "Δ mean ln π(y−) [min, max]",
        "pairs with ln π(y+) down",
        "loss init → final",
    ]
    rows = []
    for m in cfg.measures:
        a = agg[m]
        for k, p in enumerate(cfg.percentiles):
            v = scores[m][wins[(m, p)]]
            rows.append(
                [
                    LABELS[m],
                    f"{p:g}",
                    f"{format_number(v.min(), 3)} – {format_number(v.max(), 3)}",
                    _cell(a["chosen_mean"][k], a["chosen_min"][k], a["chosen_max"][k]),
                    _cell(a["rejected_mean"][k], a["rejected_min"][k], a["rejected_max"][k]),
                    f"{a['displaced'][k]:.2f}",
                    f"{a['loss_init'][k]:.4f} → {a['loss_final'][k]:.4f}",
                ]
            )
    title = (
        f"# E2: change of the mean log-probabilities over each percentile window\n\n"
        f"{meta['title']} on {meta['data']}; {cfg.loss.name.upper()}, lr {meta['lr']:g}, "
        f"windows of {cfg.window} of {meta['pool']} pairs, {cfg.seeds} seed(s): mean over seeds "
        f"[min, max].\n\n"
    )
    corr = markdown_table(
        ["measure", "Spearman ρ(percentile, −Δ ln π(y+)) over seed means", "over all runs"],
        [[LABELS[m], _fmt_rho(rho[m]["means"]), _fmt_rho(rho[m]["runs"])] for m in cfg.measures],
        "lrr",
    )
    times = markdown_table(
        ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in meta["stage_seconds"].items()], "lr"
    )
    return (
        title
        + markdown_table(header, rows, "lrlrrrr")
        + "\n"
        + corr
        + "\nρ = 1: the higher the percentile, the larger the decrease of ln π(y+).\n\n## Wall time\n\n"
        + times
    )


def _fmt_rho(x) -> str:
    return "–" if x is None else f"{x:+.2f}"


def figure2(path: Path, cfg, meta: dict, agg: dict) -> Path:
    """Change of the mean ln π(y+|x) against the percentile, one line per measure, error bars
    from the min to the max over seeds (paper Figure 2)."""
    plt = report.plt
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for m in cfg.measures:
        a = agg[m]
        y = np.asarray(a["chosen_mean"])
        err = np.stack([y - np.asarray(a["chosen_min"]), np.asarray(a["chosen_max"]) - y])
        ax.errorbar(cfg.percentiles, y, yerr=err, marker="o", capsize=3, lw=1.8, label=LABELS[m])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(cfg.percentiles)
    ax.set_xlabel("percentile of the measure")
    ax.set_ylabel("change of mean ln π(y+|x)")
    ax.set_title(
        f"{meta['title']}: {cfg.loss.name.upper()}, {cfg.window} samples per window", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


FENCE = "~~~~~"  # code fences that the replies' own ``` blocks cannot close


def _text(x, limit: int = 1500) -> str:
    """A prompt or reply as one Markdown-safe block (chat lists as `role: content` lines)."""
    if not isinstance(x, str):
        x = "\n".join(f"{m['role']}: {m['content']}" for m in x)
    x = x.strip()
    return x if len(x) <= limit else x[:limit] + f" … [{len(x) - limit} more characters]"


def samples_md(cfg, meta: dict, pool, scores, records) -> str:
    """The `samples_shown` highest and lowest CHES pairs (paper Tables 14/15)."""
    by_index = {r.index: r for r in records}
    order = np.argsort(scores["ches"], kind="stable")
    k = min(cfg.samples_shown, len(order))
    parts = [
        f"# Highest and lowest CHES pairs\n\n{meta['title']} on {meta['data']} ({meta['pool']} pairs; "
        "lengths are response tokens including EOS, after truncation).\n"
    ]
    for title, picks in ((f"{k} highest CHES", order[::-1][:k]), (f"{k} lowest CHES", order[:k])):
        parts.append(f"\n## {title}\n")
        for rank, i in enumerate(picks, 1):
            p, rec = pool[i], by_index[pool[i].index]
            parts.append(
                f"\n### {rank}. sample {p.index}: CHES {format_number(scores['ches'][i], 4)}, "
                f"ln-CHES {format_number(scores['ln_ches'][i], 4)}, |y+| = {len(p.chosen_ids)}, "
                f"|y−| = {len(p.rejected_ids)}, prompt {len(p.prompt_ids)} tokens\n\n"
                f"**Prompt**\n\n{FENCE}text\n{_text(rec.prompt)}\n{FENCE}\n\n"
                f"**Preferred (y+)**\n\n{FENCE}text\n{_text(rec.chosen)}\n{FENCE}\n\n"
                f"**Dispreferred (y−)**\n\n{FENCE}text\n{_text(rec.rejected)}\n{FENCE}\n"
            )
    return "".join(parts)


def write_outputs(cfg, meta, pool, scores, wins, recs, records) -> dict:
    """table.md, figure2.png, samples.md in `cfg.out_dir`; returns the results.json content."""
    out = Path(cfg.out_dir)
    agg = aggregate(cfg, recs)
    rho = spearman(cfg, agg, recs)
    md = table(cfg, meta, scores, wins, agg, rho)
    files.write_text(out / "table.md", f"{md.rstrip()}\n\n{weights_note(cfg.model)}\n")
    figure2(out / "figure2.png", cfg, meta, agg)
    files.write_text(out / "samples.md", samples_md(cfg, meta, pool, scores, records))
    window_info = {
        f"{m}/p{p:g}": {
            "indices": [pool[i].index for i in pos],
            "min": float(scores[m][pos].min()),
            "max": float(scores[m][pos].max()),
        }
        for (m, p), pos in wins.items()
    }
    return {
        "meta": meta,
        "config": cfg,
        "aggregate": agg,
        "spearman": rho,
        "windows": window_info,
        "runs": recs,
        "table_md": md,
    }
