"""E1's statistics per setting and pair, and the plain-language verdict (issue 19).

Operates on the `runs` of results.json (`report._run_json`: loss, logp_pos, logp_neg, watch_ids,
watch_p `[steps + 1, n_watch]`, the Theorem 5 Spearman values and set_mass0), so a summary can be
rebuilt from the files alone. All rules here were fixed before any run of the new protocol:

- Definition 1 (paper §2.2, per sample): final ln π(y+) < initial, and the loss fell
  (final < initial). Counted over the kept runs (loss falling at every step), with a Wilson 95%
  interval.
- A drop ≥ 0.2: the largest π_t(y+) − π_t′(y+) over t < t′ (paper J.1) is ≥ 0.2; Wilson 95%.
- The mean largest drop, with a percentile-bootstrap 95% interval over the kept runs.
- Catastrophic on the same steps: a watched token of the opposite meaning (yes-words for a
  no-word y+ and the reverse) gains, summed over the steps t → t+1 where π(y+) falls, at least
  a tenth of what π(y+) loses on those same steps, and π(y+) loses at least 0.01 on them (below
  that the steps are float noise).
"""

from __future__ import annotations

import numpy as np

from ld_jax import stats
from ld_jax.experiments.persona.report import largest_decrease, loss_rose, meaning_of, token_label

OPPOSITE = {"yes": "no", "no": "yes"}
MIN_FALL = 0.01  # π(y+) must lose this much over its falling steps for a run to be judged
SHARE = 0.1  # an opposite token counts when it gains this share of y+'s loss on those steps


def falling_gains(run: dict) -> tuple[float, np.ndarray]:
    """(π(y+)'s total loss over the steps where it falls, each watched token's total change
    over those same steps `[n_watch]`)."""
    pi = np.exp(np.asarray(run["logp_pos"], np.float64))
    watch = np.asarray(run["watch_p"], np.float64)
    falls = np.diff(pi) < 0  # [steps]: step t -> t+1 lowers π(y+)
    return float(-np.diff(pi)[falls].sum()), np.diff(watch, axis=0)[falls].sum(0)


def catastrophic_same_steps(run: dict, tokenizer, meanings: dict) -> list[int]:
    """Ids of the opposite-meaning watched tokens that gained while π(y+) fell (rule above)."""
    ids = [int(i) for i in run["watch_ids"]]
    mine = meaning_of(tokenizer, ids[0], meanings)
    if mine not in OPPOSITE:
        return []
    lost, gains = falling_gains(run)
    if lost < MIN_FALL:
        return []
    return sorted(
        {
            t
            for t, g in zip(ids[2:], gains[2:])
            if g >= SHARE * lost and meaning_of(tokenizer, t, meanings) == OPPOSITE[mine]
        }
    )


def pair_statistics(runs: list[dict], tokenizer, meanings: dict) -> dict:
    """The issue's statistics for one pair's runs (all of them; the kept ones are counted)."""
    kept = [r for r in runs if not loss_rose(r["loss"])]
    n = len(kept)
    out = {"runs": len(runs), "runs_kept": n}
    if not n:
        return out
    logp = [np.asarray(r["logp_pos"], np.float64) for r in kept]
    loss = [np.asarray(r["loss"], np.float64) for r in kept]
    d1 = sum(bool(lp[-1] < lp[0] and ls[-1] < ls[0]) for lp, ls in zip(logp, loss))
    drops = np.array([largest_decrease(np.exp(lp))[0] for lp in logp])
    big = int((drops >= 0.2).sum())
    cat = [catastrophic_same_steps(r, tokenizer, meanings) for r in kept]
    n_cat = sum(bool(c) for c in cat)
    out |= {
        "pi_pos_start_mean": float(np.mean([np.exp(lp[0]) for lp in logp])),
        "pi_pos_end_mean": float(np.mean([np.exp(lp[-1]) for lp in logp])),
        "definition1_runs": {"k": d1, "n": n, "wilson95": list(stats.wilson(d1, n))},
        "drop_ge_0.2_runs": {"k": big, "n": n, "wilson95": list(stats.wilson(big, n))},
        "mean_largest_drop": {
            "mean": float(drops.mean()),
            "bootstrap95": list(stats.bootstrap(np.mean, drops)),
            "max": float(drops.max()),
            "per_run": drops.tolist(),
        },
        "catastrophic_same_steps": {
            "k": n_cat,
            "n": n,
            "fraction": n_cat / n,
            "wilson95": list(stats.wilson(n_cat, n)),
            "tokens": sorted({token_label(tokenizer, t) for c in cat for t in c}),
        },
        "loss_end_over_start": float(np.mean([ls[-1] / ls[0] for ls in loss])),
    }
    for key in (
        "set_mass0",
        "theorem5_spearman",
        "theorem5_spearman_rate",
        "theorem5_spearman_update",
    ):
        vals = [float(r[key]) for r in kept if key in r]
        if vals:
            out[key] = {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}
    out["gained_while_falling"] = gained_while_falling(kept, tokenizer)
    return out


def gained_while_falling(kept: list[dict], tokenizer, top: int = 4) -> list[dict]:
    """The watched tokens (other than y±) with the largest mean gain over the steps where π(y+)
    fell, and in how many runs each gained there."""
    ids = [int(i) for i in kept[0]["watch_ids"]]
    gains = np.stack([falling_gains(r)[1] for r in kept])  # [runs, n_watch]
    order = np.argsort(-gains.mean(0))
    rows, seen = [], {ids[0], ids[1]}
    for c in order:
        if ids[c] in seen or gains[:, c].mean() <= 0:
            continue
        seen.add(ids[c])
        rows.append(
            {
                "token": token_label(tokenizer, ids[c]),
                "mean_gain": float(gains[:, c].mean()),
                "runs": int((gains[:, c] > 0).sum()),
            }
        )
        if len(rows) == top:
            break
    return rows


def setting_records(results: dict) -> list[dict]:
    """One record per pair of a setting: the keys of issue 19's summary.json, and
    `prompt_format` and `sft_steps` (None without SFT), which tell apart settings that those
    keys alone do not (chat or plain prompt; SFT phases of different lengths)."""
    cfg, out = results["config"], []
    sft_steps = results["sft"]["steps"] if cfg["sft"]["enabled"] and results.get("sft") else None
    for s in results["pairs"]:
        st = s["statistics"]
        out.append(
            {
                "model": results["title"],
                "loss": cfg["loss"]["name"],
                "lr": results["lr"],
                "sft": bool(cfg["sft"]["enabled"]),
                "sft_steps": sft_steps,
                "prompt_format": results["prompt_format"],
                "steps": cfg["steps"],
                "pair": [s["y_pos"], s["y_neg"]],
                "runs": st["runs"],
                "runs_kept": st["runs_kept"],
                "pi_pos_start_mean": st.get("pi_pos_start_mean"),
                "set_mass_start_mean": st.get("set_mass0", {}).get("mean"),
                "definition1_runs": st.get("definition1_runs"),
                "drop_ge_0.2_runs": st.get("drop_ge_0.2_runs"),
                "mean_largest_drop": st.get("mean_largest_drop", {}).get("mean"),
                "theorem5_spearman": st.get("theorem5_spearman"),
            }
        )
    return out


def verdict(results: dict) -> str:
    """The plain-language ending of a run: per pair, how many runs displaced (Definition 1), the
    largest drop, which tokens gained while π(y+) fell."""
    cfg = results["config"]
    head = (
        f"Verdict ({results['title']}, {cfg['loss']['name'].upper()} lr {results['lr']:g}, "
        f"{'after the SFT phase' if cfg['sft']['enabled'] else 'no SFT phase'}, "
        f"{results['prompt_format']} prompt, {cfg['steps']} steps):"
    )
    lines = [head]
    for s in results["pairs"]:
        st, pair = s["statistics"], f"({s['y_pos']}, {s['y_neg']})"
        if not st.get("runs_kept"):
            lines.append(f"- {pair}: no run kept (the loss rose at some step in all {st['runs']}).")
            continue
        d1, drop = st["definition1_runs"], st["mean_largest_drop"]
        lo, hi = d1["wilson95"]
        gained = ", ".join(
            f"{g['token']} (+{g['mean_gain']:.2g}, {g['runs']} runs)"
            for g in st["gained_while_falling"]
        )
        cat = st["catastrophic_same_steps"]
        lines.append(
            f"- {pair}: π({s['y_pos']}) fell overall (Definition 1) in {d1['k']} of {d1['n']} runs "
            f"(95% CI {lo:.2f}–{hi:.2f}); π({s['y_pos']}) {st['pi_pos_start_mean']:.3g} → "
            f"{st['pi_pos_end_mean']:.3g} on average; largest drop {drop['max']:.3g}, "
            f"{st['drop_ge_0.2_runs']['k']} runs dropped ≥ 0.2. Gained while π({s['y_pos']}) fell: "
            f"{gained or 'nothing watched'}. Opposite-meaning gain on the same steps: "
            f"{cat['k']} of {cat['n']} runs{' (' + ', '.join(cat['tokens']) + ')' if cat['tokens'] else ''}."
        )
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """summary.json's records as one Markdown table (docs/results/persona.md)."""
    from ld_jax import report

    def count(c):
        return (
            "–"
            if c is None
            else f"{c['k']}/{c['n']} [{c['wilson95'][0]:.2f}, {c['wilson95'][1]:.2f}]"
        )

    def num(x):
        return "–" if x is None else report.format_number(x)

    rows = [
        [
            r["model"],
            r["loss"].upper(),
            f"{r['lr']:g}",
            f"{r['sft_steps']} steps" if r["sft"] else "no",
            r["prompt_format"],
            str(r["steps"]),
            f"({r['pair'][0]}, {r['pair'][1]})",
            f"{r['runs_kept']}/{r['runs']}",
            num(r["set_mass_start_mean"]),
            num(r["pi_pos_start_mean"]),
            count(r["definition1_runs"]),
            count(r["drop_ge_0.2_runs"]),
            num(r["mean_largest_drop"]),
            "–" if r["theorem5_spearman"] is None else f"{r['theorem5_spearman']['mean']:.2f}",
        ]
        for r in records
    ]
    header = [
        "model",
        "loss",
        "lr",
        "SFT",
        "prompt",
        "steps",
        "pair",
        "kept",
        "set mass at start",
        "π(y+) at start",
        "Definition 1 [Wilson 95%]",
        "drop ≥ 0.2 [Wilson 95%]",
        "mean largest drop",
        "Theorem 5 Spearman",
    ]
    return report.markdown_table(header, rows, "llllllllrrrrrr")


def setting_table(results: dict) -> str:
    """One setting's statistics per pair as a Markdown table (docs/results/persona.md): kept
    runs, the set mass and π(y±) at the start and the end (means over kept runs), the Definition-1
    and drop-≥-0.2 counts with Wilson intervals, the mean largest drop with its bootstrap
    interval, the final loss over the initial one and the Theorem 5 Spearman."""
    from ld_jax import report

    num = report.format_number

    def count(c):
        return f"{c['k']}/{c['n']} [{c['wilson95'][0]:.2f}, {c['wilson95'][1]:.2f}]"

    def spread(xs):
        return f"{num(float(np.mean(xs)))} ({num(float(np.min(xs)))}–{num(float(np.max(xs)))})"

    rows = []
    for p, s in enumerate(results["pairs"]):
        st = s["statistics"]
        kept = [r for r in results["runs"] if r["pair"] == p and not r["excluded"]]
        if not kept:
            rows.append([f"({s['y_pos']}, {s['y_neg']})", f"0/{st['runs']}"] + ["–"] * 8)
            continue
        neg = np.exp([[r["logp_neg"][0], r["logp_neg"][-1]] for r in kept]).mean(axis=0)
        drop = st["mean_largest_drop"]
        rows.append(
            [
                f"({s['y_pos']}, {s['y_neg']})",
                f"{st['runs_kept']}/{st['runs']}",
                num(st["set_mass0"]["mean"]),
                f"{num(st['pi_pos_start_mean'])} → {num(st['pi_pos_end_mean'])}",
                f"{num(neg[0])} → {num(neg[1])}",
                count(st["definition1_runs"]),
                count(st["drop_ge_0.2_runs"]),
                f"{num(drop['mean'])} [{num(drop['bootstrap95'][0])}, {num(drop['bootstrap95'][1])}]",
                spread([r["loss"][-1] / r["loss"][0] for r in kept]),
                spread([r["theorem5_spearman"] for r in kept]),
            ]
        )
    head = [
        "pair",
        "kept",
        "set mass at start",
        "π(y+) start → end",
        "π(y−) start → end",
        "Definition 1 [Wilson 95%]",
        "drop ≥ 0.2 [Wilson 95%]",
        "mean largest drop [bootstrap 95%]",
        "loss end / start, mean (min–max)",
        "Theorem 5 Spearman, mean (min–max)",
    ]
    return report.markdown_table(head, rows, "llrrrrrrrr")


def collect(root: str, out: str) -> list[dict]:
    """Every setting's records under `root` (one directory per setting, rebuilt from its
    results.json) in one file, `out` (docs/results/persona/summary.json):
    python -m ld_jax.experiments.persona.verdict docs/results/persona/e1 docs/results/persona/summary.json
    """
    import json
    from pathlib import Path

    from ld_jax import files

    records = [
        rec
        for path in sorted(Path(root).glob("*/results.json"))
        for rec in setting_records(json.loads(path.read_text()))
    ]
    files.write_json(out, records, indent=1)
    return records


if __name__ == "__main__":
    import sys

    print(f"{len(collect(*sys.argv[1:3]))} records")
