"""E3 outputs: results.json, table.md (refusal rates before/after per condition, paper Figure 3
as a table), pair_types.md, figure3.png (bars), figure4.png (train pairs ranked by
length-normalised CHES, coloured by pair type) and examples.md (paper Table 18: both initial
samples refused, the trained model complies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ld_jax import files
from ld_jax.experiments.unalign.onpolicy import PAIR_TYPES
from ld_jax.models.pull import weights_note
from ld_jax.report import format_number, markdown_table, plt, write_json

COLORS = {
    "refusal/refusal": "tab:blue",
    "refusal/compliance": "tab:green",
    "compliance/compliance": "tab:red",
}


def best_sft(runs: dict, lambdas) -> str | None:
    """The SFT-term run with the highest mean train refusal rate (the paper's choice of λ)."""
    names = [f"sft_{lam:g}" for lam in lambdas if f"sft_{lam:g}" in runs]
    return max(names, key=lambda n: runs[n]["train"]["mean"]) if names else None


def reported(runs: dict, lambdas) -> list[str]:
    """The keys of `runs` that the table reports, in the paper's order: full, best SFT, gold,
    CHES, CHES with equal updates."""
    keys = ["full", best_sft(runs, lambdas), "gold", "ches", "ches_equal_updates"]
    return [k for k in keys if k is not None and k in runs]


def label(key: str, runs: dict, loss: str, lambdas) -> str:
    r = runs[key]
    if key == "full":
        return f"{loss.upper()} on full data"
    if key.startswith("sft_"):
        return f"+ SFT term (λ = {r['loss']['sft_lambda']:g}, best of {len(lambdas)})"
    if key == "gold":
        return "gold HH-RLHF pairs"
    if key == "ches":
        return f"lowest length-normalised CHES ({r['pairs']} pairs)"
    return f"the same CHES pairs, {r['epochs']} epochs ({r['steps']} updates)"


def conditions(result: dict, lambdas) -> list[tuple[str, dict]]:
    """(label, run) in the paper's order: full, best SFT, gold, CHES."""
    runs, loss = result["runs"], result["config"]["loss"]["name"]
    return [(label(k, runs, loss, lambdas), runs[k]) for k in reported(runs, lambdas)]


def seeds_table(result: dict, lambdas) -> str:
    """Each reported condition over its training seeds, when there is more than one."""
    seeds, runs = result.get("training_seeds") or {}, result["runs"]
    if not any(len(s["seeds"]) > 1 for s in seeds.values()):
        return ""
    loss = result["config"]["loss"]["name"]

    def rate(r):
        lo, hi = r["bootstrap95"]
        per_seed = ", ".join(f"{100 * x:.1f}" for x in r["rates"])
        return f"{100 * r['mean']:.1f} (95% CI {100 * lo:.1f}–{100 * hi:.1f}; seeds {per_seed})"

    rows = [
        [
            label(k, runs, loss, lambdas),
            len(s["seeds"]),
            rate(s["train"]),
            rate(s["test"]),
            ", ".join(format_number(x) for x in s["logp_chosen_change"]),
        ]
        for k, s in seeds.items()
    ]
    head = ["condition", "training seeds", "train refusal %", "test refusal %", "Δ mean ln π(y+)"]
    return (
        "\nOver training seeds (the order of the pairs; the same data, loss and lr):\n\n"
        + markdown_table(head, rows, "lrrrr")
        + "\nRefusal %: the mean over training seeds of each run's mean over evaluation seeds; "
        "the interval resamples prompts, each keeping its replies of every training and "
        "evaluation seed.\n"
    )


def _rate(r: dict) -> str:
    """mean [min, max over evaluation seeds], then the prompt bootstrap's 95% interval."""
    rates = r["rates"]
    text = f"{100 * np.mean(rates):.1f} [{100 * min(rates):.1f}, {100 * max(rates):.1f}]"
    if "bootstrap95" in r:  # absent from runs made before it was recorded
        lo, hi = r["bootstrap95"]
        text += f" (95% CI {100 * lo:.1f}–{100 * hi:.1f})"
    return text


def table(result: dict, lambdas) -> str:
    before = result["before"]
    rows = [
        ["initial (starting model)", "–", _rate(before["train"]), _rate(before["test"]), "–", "–"]
    ]
    for label, r in conditions(result, lambdas):
        changes = [format_number(r[f"logp_{k}_change"]) for k in ("chosen", "rejected")]
        rows.append([label, r["pairs"], _rate(r["train"]), _rate(r["test"]), *changes])
    head = [
        "model",
        "train pairs",
        "train refusal %",
        "test refusal %",
        "Δ mean ln π(y+)",
        "Δ mean ln π(y−)",
    ]
    text = markdown_table(head, rows, "lrrrrr")
    sft = [(n, r) for n, r in result["runs"].items() if n.startswith("sft_")]
    if sft:
        text += "\nSFT-term runs (the best by train refusal rate is in the table above):\n\n"
        text += markdown_table(
            ["λ", "train refusal %", "test refusal %", "Δ mean ln π(y+)"],
            [
                [
                    r["loss"]["sft_lambda"],
                    _rate(r["train"]),
                    _rate(r["test"]),
                    format_number(r["logp_chosen_change"]),
                ]
                for _, r in sft
            ],
            "rrrr",
        )
    return (
        text
        + "\nRefusal %: mean over the evaluation seeds [min, max], with a 95% percentile-bootstrap interval over prompts where recorded; temperature 0.7.\n"
        + seeds_table(result, lambdas)
    )


def pair_type_table(result: dict) -> str:
    train, everything = result["pair_types"], result["pair_types_all"]
    n_train, n_all = max(sum(train.values()), 1), max(sum(everything.values()), 1)
    rows = [
        [
            t,
            everything[t],
            f"{100 * everything[t] / n_all:.1f}",
            train[t],
            f"{100 * train[t] / n_train:.1f}",
        ]
        for t in PAIR_TYPES
    ]
    text = markdown_table(["pair type", "all pairs", "%", "train pairs", "%"], rows, "lrrrr")
    left_out = ", ".join(f"{k} {v}" for k, v in result["pair_counts"].items()) or "none"
    return text + f"\nPairs left out: {left_out}. Tokenisation: {result['filter']}.\n"


def displacement_by_type(out: Path, result: dict, name: str = "full") -> str:
    """Mean change of ln π(y±|x) per pair type over the train pairs of run `name` (from the
    loop's logps.npz), and how many pairs lost ln π(y+): where the displacement happened."""
    run = result["runs"].get(name)
    path = (
        None if run is None else out / "runs" / run["name"] / "logps.npz"
    )  # the run's loop directory
    if path is None or not path.is_file():
        return ""
    z = np.load(path)
    change = dict(zip(z["index"].tolist(), (z["final"] - z["init"]).tolist()))
    rows = []
    for t in PAIR_TYPES:
        d = np.asarray(
            [
                change[p["index"]]
                for p in result["train_pairs"]
                if p["type"] == t and p.get("index") in change
            ]
        )
        if len(d):
            rows.append(
                [
                    t,
                    len(d),
                    format_number(d[:, 0].mean()),
                    format_number(d[:, 1].mean()),
                    f"{int((d[:, 0] < 0).sum())}/{len(d)}",
                ]
            )
    if not rows:
        return ""
    head = ["pair type", "pairs", "Δ mean ln π(y+)", "Δ mean ln π(y−)", "pairs with ln π(y+) down"]
    return "\nChange over one epoch on the full data, by pair type:\n\n" + markdown_table(
        head, rows, "lrrrr"
    )


def figure3(path: Path, result: dict, lambdas) -> None:
    rows = [("initial", result["before"])] + [
        (label.split(" (")[0], r) for label, r in conditions(result, lambdas)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("train", "test")):
        means = [100 * np.mean(r[split]["rates"]) for _, r in rows]
        lo = [m - 100 * min(r[split]["rates"]) for m, (_, r) in zip(means, rows)]
        hi = [100 * max(r[split]["rates"]) - m for m, (_, r) in zip(means, rows)]
        ax.bar(
            range(len(rows)),
            means,
            yerr=[lo, hi],
            capsize=4,
            color=["gray"] + ["tab:blue"] * (len(rows) - 1),
        )
        ax.set_xticks(range(len(rows)), [n for n, _ in rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{split} prompts")
        ax.set_ylabel("refusal rate (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{result['title']}: refusal rate before and after training (error bars: min/max over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def figure4(path: Path, result: dict) -> None:
    scores, types = np.asarray(result["ches"]["ln_ches"]), result["ches"]["pair_type"]
    order = np.argsort(scores, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in PAIR_TYPES:
        ranks = [k for k, i in enumerate(order) if types[i] == t]
        ax.scatter(ranks, scores[order][ranks], s=12, color=COLORS[t], label=f"{t} ({len(ranks)})")
    if result["ches"]["kept"]:
        ax.axvline(
            len(result["ches"]["kept"]) - 0.5, color="k", lw=0.8, ls="--", label="CHES filter cut"
        )
    ax.set_xlabel("train pairs ranked by length-normalised CHES")
    ax.set_ylabel("length-normalised CHES")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"{result['title']}: on-policy pairs (paper Figure 4)", fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def examples(result: dict, shown: int) -> str:
    """Train prompts whose two initial samples were both refusals, and where the model trained
    on the full data complies (its seed-0 reply)."""
    run = result["runs"].get("full")
    if run is None:
        return "No `full` run, so no examples.\n"
    replies = dict(zip(result["train_prompts"], run["train"]["replies"]))
    found = [
        (p, replies[p["prompt"]])
        for p in result["train_pairs"]
        if p["type"] == "refusal/refusal" and replies.get(p["prompt"], ("", ""))[1] == "compliance"
    ]
    loss = result["config"]["loss"]["name"].upper()
    lines = [
        f"# Both initial samples refused; after {loss} on the full data the model complies (by the judge)\n",
        f"{len(found)} train prompts of {len(result['train_pairs'])} (reply: seed 0, temperature 0.7).\n",
    ]
    for p, (reply, _) in found[:shown]:
        lines += [
            f"**Prompt:** {p['prompt']}\n",
            f"- initial sample (chosen): {p['chosen']}",
            f"- initial sample (rejected): {p['rejected']}",
            f"- after training: {reply}\n",
        ]
    return "\n".join(lines) + "\n"


def write_all(out: Path, result: dict, lambdas, shown: int) -> dict:
    texts = {
        "table_md": f"{table(result, lambdas).rstrip()}\n\n{weights_note(result['config']['model'])}\n",
        "pair_types_md": pair_type_table(result) + displacement_by_type(out, result),
        "examples_md": examples(result, shown),
    }
    files.write_text(out / "table.md", texts["table_md"])
    files.write_text(out / "pair_types.md", texts["pair_types_md"])
    files.write_text(out / "examples.md", texts["examples_md"])
    figure3(out / "figure3.png", result, lambdas)
    figure4(out / "figure4.png", result)
    write_json(out / "results.json", result)
    return texts
