"""Tracked Persona runs -> the paper's tables (1/2/3, 4-12 and 13), plots and results.json.

A run record (from `persona.run.Runner.train`) holds `[steps + 1, ...]` arrays: loss, logp_pos,
logp_neg, top_ids / top_inc `[.., track_k]`, watch_p `[.., n_watch]`, w_inner, proj_par,
proj_perp, h_norm, plus `run` (pair, seed, prompt, lr) and `watch_ids` `[n_watch]`, whose first
two entries are y+ and y−.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np

from ld_jax import files, report
from ld_jax.config import to_dict
from ld_jax.experiments.protocol import STABILITY_RULES
from ld_jax.models.pull import weights_note


def loss_rose(loss: np.ndarray) -> bool:
    """Whether a training loss `[steps + 1]` failed to fall strictly at some step (the run is then
    excluded, and in the lr search the lr is rejected)."""
    return not STABILITY_RULES["falls_every_step"](np.asarray(loss, np.float64))


def largest_decrease(pi: np.ndarray) -> tuple[float, float, float]:
    """(decrease, from, to): the largest π_t − π_t′ over steps t < t′ (paper J.1); 0 if π never falls."""
    best_before = np.maximum.accumulate(pi)[:-1]  # max_{t < t'} π_t, for t' = 1..T
    drops = best_before - pi[1:]
    j = int(np.argmax(drops))
    if drops[j] <= 0:
        return 0.0, float(pi[0]), float(pi[0])
    return float(drops[j]), float(best_before[j]), float(pi[j + 1])


def token_label(tokenizer, token_id: int) -> str:
    """The token's text with a leading space shown as "_", as in the paper's tables."""
    text = tokenizer.decode([int(token_id)])
    text = "_" + text[1:] if text.startswith(" ") else text
    return repr(text)[1:-1] if not text.isprintable() else text


def meaning_of(tokenizer, token_id: int, meanings: dict) -> str | None:
    """The configured meaning of a token; lower-case and leading-space variants share it."""
    lookup = {w.lower(): m for m, words in meanings.items() for w in words}
    return lookup.get(tokenizer.decode([int(token_id)]).strip().lower())


def classify(tokenizer, token_id: int, y_pos_id: int, meanings: dict) -> str:
    """benign (same meaning as y+), catastrophic (another known meaning) or unclassified."""
    mine, target = (
        meaning_of(tokenizer, token_id, meanings),
        meaning_of(tokenizer, y_pos_id, meanings),
    )
    if mine is None or target is None:
        return "unclassified"
    return "benign" if mine == target else "catastrophic"


def step_table(kept: list[dict], step: int, top_k: int) -> list[dict]:
    """Tables 4-12: every token in some run's top-k gainers at `step`, its mean increase over the
    runs where it was there, and in how many runs."""
    seen = collections.defaultdict(list)
    for rec in kept:
        for tid, inc in zip(rec["top_ids"][step][:top_k], rec["top_inc"][step][:top_k]):
            seen[int(tid)].append(float(inc))
    rows = [{"id": t, "mean_increase": float(np.mean(v)), "count": len(v)} for t, v in seen.items()]
    return sorted(rows, key=lambda r: (-r["count"], -r["mean_increase"]))


def summarize_pair(cfg, p: int, recs: list[dict], tokenizer) -> dict:
    y_pos, y_neg = cfg.pairs[p]
    mine = [r for r in recs if r["run"].pair == p]
    kept = [r for r in mine if not loss_rose(r["loss"])]
    pos_id, neg_id = (int(i) for i in mine[0]["watch_ids"][:2])
    out = {
        "y_pos": y_pos,
        "y_neg": y_neg,
        "y_pos_id": pos_id,
        "y_neg_id": neg_id,
        "runs": len(mine),
        "kept": len(kept),
        "excluded": len(mine) - len(kept),
    }
    first = mine[0]  # every run of a pair starts from the same params, so W at step 0 is shared
    out["table13_init"] = {k: float(first[k][0]) for k in ("proj_par", "proj_perp", "w_inner")}
    predicted = [int(i) for i in first["watch_ids"][2 : 2 + cfg.top_k + 2]]
    out["theorem5_predicted"] = [{"id": i, "token": token_label(tokenizer, i)} for i in predicted]
    if not kept:
        return out
    drops = [largest_decrease(np.exp(r["logp_pos"])) for r in kept]
    d, f, t = (np.array(x) for x in zip(*drops))
    out["decrease"] = {
        "mean": float(d.mean()),
        "from": float(f.mean()),
        "to": float(t.mean()),
        "max": float(d.max()),
        "per_run": d.tolist(),
        "runs_ge_0.2": int((d >= 0.2).sum()),
    }
    out["table13_final"] = {
        k: float(np.mean([r[k][-1] for r in kept])) for k in ("proj_par", "proj_perp", "w_inner")
    }
    out["step_tables"] = {}
    gainers = collections.Counter()
    for s in cfg.report_steps:
        rows = step_table(kept, s, cfg.top_k)
        for row in rows:
            row["token"] = token_label(tokenizer, row["id"])
            row["class"] = {pos_id: "y+", neg_id: "y−"}.get(row["id"]) or classify(
                tokenizer, row["id"], pos_id, cfg.meanings
            )
            if row["id"] not in (pos_id, neg_id) and row["mean_increase"] > 0:
                gainers[row["id"]] += row["count"]
        out["step_tables"][str(s)] = rows
    out["gainers"] = {c: [] for c in ("benign", "catastrophic", "unclassified")}
    for tid, _ in gainers.most_common():
        out["gainers"][classify(tokenizer, tid, pos_id, cfg.meanings)].append(
            token_label(tokenizer, tid)
        )
    observed = {row["id"] for rows in out["step_tables"].values() for row in rows}
    out["theorem5_hits"] = sum(i in observed for i in predicted)
    return out


def _fmt_tokens(tokens: list[str], n: int = 6) -> str:
    return (
        ", ".join(tokens[:n]) + (f" (+{len(tokens) - n})" if len(tokens) > n else "")
        if tokens
        else "–"
    )


def table1(title: str, pairs: list[dict]) -> str:
    fmt = report.format_number
    rows = []
    for s in pairs:
        dec = s.get("decrease")
        cells = [title, s["y_pos"], s["y_neg"], f"{s['kept']}/{s['runs']}"]
        if dec is None:
            rows.append(cells + ["no run kept", "–", "–", "–", "–"])
            continue
        g = s["gainers"]
        rows.append(
            cells
            + [
                f"{fmt(dec['mean'])} ({fmt(dec['from'])} → {fmt(dec['to'])})",
                fmt(dec["max"]),
                _fmt_tokens(g["benign"]),
                _fmt_tokens(g["catastrophic"]),
                _fmt_tokens(g["unclassified"]),
            ]
        )
    header = [
        "model",
        "y+",
        "y−",
        "runs kept",
        "π(y+) decrease, mean (from → to)",
        "max",
        "benign gainers",
        "catastrophic gainers",
        "unclassified gainers",
    ]
    return report.markdown_table(header, rows, align="llllllll l".replace(" ", ""))


def trajectory_table(pairs: list[list[str]], runs: list[dict], drop: float = 0.2) -> str:
    """Where π(y+) starts and ends, per pair, over the kept runs of results.json (`runs`: dicts with
    pair, excluded, logp_pos and logp_neg `[steps + 1]`); counts the kept runs whose π(y+) fell by
    at least `drop` at some point (the issue's must-show: a fall while the loss falls at every step)."""
    fmt = report.format_number
    rows = []
    for p, (y_pos, y_neg) in enumerate(pairs):
        kept = [r for r in runs if r["pair"] == p and not r["excluded"]]
        if not kept:
            rows.append([y_pos, y_neg, "0", "–", "–", "–", "–"])
            continue
        pi = np.exp(np.array([r["logp_pos"] for r in kept], np.float64))
        start, end = pi[:, 0], pi[:, -1]
        drops = [largest_decrease(x)[0] for x in pi]
        rows.append(
            [
                y_pos,
                y_neg,
                str(len(kept)),
                f"{fmt(start.mean())} [{fmt(start.min())}, {fmt(start.max())}]",
                f"{fmt(end.mean())} [{fmt(end.min())}, {fmt(end.max())}]",
                fmt(max(np.exp(r["logp_neg"][-1]) for r in kept)),
                str(sum(d >= drop for d in drops)),
            ]
        )
    header = [
        "y+",
        "y−",
        "runs kept",
        "π(y+) at step 0, mean [min, max]",
        "π(y+) at the end, mean [min, max]",
        "largest π(y−) at the end",
        f"runs with a π(y+) drop ≥ {drop:g}",
    ]
    return report.markdown_table(header, rows, "llrrrrr")


def token_tables(cfg, pairs: list[dict]) -> str:
    parts = []
    for s in pairs:
        parts.append(
            f"### y+ = {s['y_pos']}, y− = {s['y_neg']} ({s['kept']} of {s['runs']} runs kept)\n"
        )
        rows = [
            [
                step,
                r["token"],
                report.format_number(r["mean_increase"]),
                f"{r['count']}/{s['kept']}",
                r["class"],
            ]
            for step, table in s.get("step_tables", {}).items()
            for r in table
        ]
        parts.append(
            report.markdown_table(
                ["step", "token", "mean probability increase", "count", "meaning vs y+"],
                rows,
                "lrrrl",
            )
        )
    return "\n".join(parts)


def table13(title: str, pairs: list[dict]) -> str:
    fmt = report.format_number
    rows = [
        [
            title,
            s["y_pos"],
            s["y_neg"],
            fmt(s["table13_init"]["proj_par"]),
            fmt(s["table13_init"]["proj_perp"]),
            fmt(s["table13_init"]["w_inner"]),
            ", ".join(t["token"] for t in s["theorem5_predicted"]),
        ]
        for s in pairs
    ]
    header = [
        "model",
        "y+",
        "y−",
        "‖proj_{W_{y+}}(W_{y+} − W_{y−})‖",
        "‖proj⊥(W_{y+} − W_{y−})‖",
        "⟨W_{y+}, W_{y−}⟩",
        "top ⟨W_z, W_{y+} − W_{y−}⟩ (Theorem 5)",
    ]
    return report.markdown_table(header, rows, "lllrrrl")


def plot_pair(path: Path, cfg, p: int, summary: dict, recs: list[dict], tokenizer) -> Path:
    mine = [r for r in recs if r["run"].pair == p]
    shown = [r for r in mine if not loss_rose(r["loss"])] or mine
    ids = [int(i) for i in shown[0]["watch_ids"]]
    first = {i: ids.index(i) for i in dict.fromkeys(ids[2:]) if i not in ids[:2]}
    # Rank by the peak of the mean increase since init: tokens that gained early and fell back count.
    gain = {
        i: np.max(np.mean([r["watch_p"][:, c] - r["watch_p"][0, c] for r in shown], axis=0))
        for i, c in first.items()
    }
    top = sorted(gain, key=gain.get, reverse=True)[:4]
    series = lambda c: np.stack([r["watch_p"][:, c] for r in shown])  # noqa: E731
    panels = [
        report.Panel(
            "π(y+) and π(y−)",
            [
                report.Series(
                    f"π({summary['y_pos']})", np.exp(np.stack([r["logp_pos"] for r in shown]))
                ),
                report.Series(
                    f"π({summary['y_neg']})", np.exp(np.stack([r["logp_neg"] for r in shown]))
                ),
            ],
            ylabel="probability",
        ),
        report.Panel(
            "watched tokens gaining most",
            [report.Series(token_label(tokenizer, i), series(first[i])) for i in top],
            ylabel="probability",
        ),
        report.Panel(
            f"{cfg.loss.name.upper()} loss",
            [report.Series("loss", np.stack([r["loss"] for r in shown]))],
            yscale="log",
        ),
    ]
    note = "" if shown is not mine else " (no run kept; all shown)"
    return report.plot_panels(
        path,
        panels,
        title=f"y+ = {summary['y_pos']}, y− = {summary['y_neg']}: {len(shown)} runs{note}",
    )


RUN_SCALARS = (
    "set_mass0",
    "theorem5_spearman",
    "theorem5_spearman_rate",
    "theorem5_spearman_update",
    "theorem5_eta",
)


def _run_json(rec: dict, cfg) -> dict:
    return {
        **{k: float(rec[k]) for k in RUN_SCALARS if k in rec},
        **dataclasses.asdict(rec["run"]),
        "excluded": loss_rose(rec["loss"]),
        **{
            k: rec[k]
            for k in ("loss", "logp_pos", "logp_neg", "w_inner", "proj_par", "proj_perp", "h_norm")
        },
        "top_ids": rec["top_ids"][:, : cfg.top_k],
        "top_inc": rec["top_inc"][:, : cfg.top_k],
        "watch_ids": rec["watch_ids"],
        "watch_p": rec["watch_p"],
    }


def write_outputs(cfg, meta: dict, recs: list[dict], tokenizer) -> dict:
    """Write everything into cfg.out_dir; returns the results dict (with `table1_md`)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ld_jax.experiments.persona import verdict  # it imports this module's helpers

    pairs = [summarize_pair(cfg, p, recs, tokenizer) for p in range(len(cfg.pairs))]
    runs = [_run_json(r, cfg) for r in recs]
    for p, s in enumerate(pairs):
        s["statistics"] = verdict.pair_statistics(
            [r for r in runs if r["pair"] == p], tokenizer, cfg.meanings
        )
    title = f"{meta['title']} ({cfg.loss.name.upper()}, {'SFT' if cfg.sft.enabled else 'no SFT'}, lr {meta['lr']:g})"
    t1 = table1(title, pairs)
    note = weights_note(cfg.model)
    files.write_text(
        out / "table1.md",
        f"# Largest π(y+) decrease and tokens gaining most (Table 1 shape)\n\n{note}\n\n{t1}\n"
        "Decrease: the largest π_t(y+) − π_t′(y+) over steps t < t′, mean over kept runs (a run is kept "
        "when its loss fell at every step). Gainers: top-"
        f"{cfg.top_k} probability increases since init at steps {', '.join(map(str, cfg.report_steps))}, "
        'other than y±, most frequent first; "_" is a leading space.\n\n'
        f"## Where π(y+) starts and ends\n\n{trajectory_table(cfg.pairs, runs)}",
    )
    files.write_text(
        out / "tokens.md",
        f"# Tokens increasing most in probability (Tables 4–12 shape)\n\n{title}\n\n{note}\n\n{token_tables(cfg, pairs)}",
    )
    files.write_text(
        out / "table13.md",
        f"# Unembedding geometry at initialisation (Table 13 shape)\n\n{note}\n\n{table13(title, pairs)}",
    )
    plots = [
        str(plot_pair(out / f"pair_{s['y_pos']}_{s['y_neg']}.png", cfg, p, s, recs, tokenizer))
        for p, s in enumerate(pairs)
    ]
    results = {
        "config": to_dict(cfg),
        **meta,
        "table_title": title,
        "pairs": pairs,
        "plots": plots,
        "runs": runs,
    }
    results["verdict"] = verdict.verdict(results)
    files.write_text(
        out / "verdict.md", f"{results['verdict']}\n\n{verdict.setting_table(results)}\n{note}\n"
    )
    report.write_json(out / "summary.json", verdict.setting_records(results))
    report.write_json(out / "results.json", results)
    return {**results, "table1_md": t1, "verdict_md": results["verdict"]}
