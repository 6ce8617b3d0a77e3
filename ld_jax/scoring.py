"""Score a whole preference dataset with CHES, and select subsets by score (paper §5, §6).

    score_file(ScoringConfig(model, data, out))   # `ld-jax ches`:   scores.jsonl
    score_file(ScoringConfig(..., measure="rate"))  # `ld-jax rate`: first-order rates
    filter_file(FilterConfig(data, scores, out))  # `ld-jax filter`: kept.jsonl

The scores file has one line per input sample, keyed by `index` (the 0-based line or row number
of the input), in the order the batches finish (longest pairs first):
`{index, ches, ln_ches, edit_distance, last_hidden_ip, len_chosen, len_rejected, truncated}`, or
`{index, skipped: reason}` for a sample that was not scored. With `measure="rate"` the score
columns are `displacement.RATE_KEYS` (pos_sq, cross, neg_sq, rate) instead. Lines are written as each batch
finishes, so memory does not grow with the dataset beyond a few floats per sample.

Length limit: `max_length` bounds prompt + response tokens of each sequence. With
`overflow="truncate"` (the paper's code) longer responses are cut to fit and counted; with
`overflow="skip"` the pair is skipped as "too_long". A prompt that leaves no room for a response
(or exceeds `max_prompt_length`) is always skipped as "prompt_too_long".
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import scipy.stats

from ld_jax import ches, displacement, distributed, files, stats
from ld_jax.data import formatting, preference
from ld_jax.data.preference import ColumnMap
from ld_jax.digest import pairs_digest
from ld_jax.errors import LdJaxError

OVERFLOW = ("truncate", "skip")
SCORE_COLUMNS = ("ches", "ln_ches", "edit_distance", "last_hidden_ip")
# measure -> (its score columns, the batch generator score_file streams; looked up at call
# time, so that the generator can be replaced, e.g. by a test that kills it)
MEASURES = {
    "ches": (SCORE_COLUMNS, lambda *a, **k: ches.score_batches(*a, **k)),
    "rate": (displacement.RATE_KEYS, lambda *a, **k: displacement.rate_batches(*a, **k)),
}


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    model: str  # checkpoint directory or known model name
    data: str  # any source `data.preference.load_preferences` reads
    out: str  # scores .jsonl
    max_length: int = 512
    max_prompt_length: int = 512
    overflow: str = "truncate"
    template: str = "auto"  # see data.formatting
    batch_size: int = 8
    dtype: str = "float32"
    columns: ColumnMap = ColumnMap()
    split: str = "train"
    limit: int | None = None
    resume: bool = False  # continue the `<out>.partial` file of a killed run
    measure: str = "ches"  # or "rate": the exact first-order rates (ld_jax.displacement)

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise LdJaxError(f"measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")
        if self.overflow not in OVERFLOW:
            raise LdJaxError(
                f"overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}"
            )
        if self.max_length < 2 or self.batch_size < 1:
            raise LdJaxError(
                f"need max_length >= 2 and batch_size >= 1, got {self.max_length}, "
                f"{self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Exactly one selection: the lowest or highest fraction by `by`, or `size` samples centred
    on the `percentile`-th percentile (paper §5: 0/25/50/75/100 with 512 samples each)."""

    data: str
    scores: str
    out: str
    by: str = "ln_ches"
    keep_lowest: float | None = None
    keep_highest: float | None = None
    percentile: float | None = None
    size: int | None = None
    columns: ColumnMap = ColumnMap()
    split: str = "train"

    def __post_init__(self):
        known = SCORE_COLUMNS + displacement.RATE_KEYS
        if self.by not in known:
            raise LdJaxError(f"--by must be one of {', '.join(known)}, got {self.by!r}")
        modes = [
            self.keep_lowest is not None,
            self.keep_highest is not None,
            self.percentile is not None,
        ]
        if sum(modes) != 1:
            raise LdJaxError(
                "choose exactly one of keep_lowest, keep_highest or percentile (with size)"
            )
        for frac in (self.keep_lowest, self.keep_highest):
            if frac is not None and not 0 < frac <= 1:
                raise LdJaxError(f"keep fractions must be in (0, 1], got {frac}")
        if (self.percentile is None) != (self.size is None):
            raise LdJaxError("percentile and size go together")
        if self.percentile is not None and not (0 <= self.percentile <= 100 and self.size >= 1):
            raise LdJaxError(
                f"need 0 <= percentile <= 100 and size >= 1, got {self.percentile}, {self.size}"
            )


# ---------------------------------------------------------------- scoring


def fit_length(pairs, max_length: int, overflow: str, report: formatting.FilterReport):
    """Apply the length limit (module docstring) -> (pairs to score, set of truncated indices)."""
    kept, truncated = [], set()
    for p in pairs:
        room = max_length - len(p.prompt_ids)  # >= 1: longer prompts were skipped already
        if max(len(p.chosen_ids), len(p.rejected_ids)) <= room:
            kept.append(p)
        elif overflow == "skip":
            report.skip(p.index, "too_long")
        else:
            kept.append(
                dataclasses.replace(
                    p, chosen_ids=p.chosen_ids[:room], rejected_ids=p.rejected_ids[:room]
                )
            )
            truncated.add(p.index)
    report.kept = len(kept)
    return kept, truncated


def prepare_pairs(records, tokenizer, cfg: ScoringConfig):
    """Records -> (the pairs `score_file` scores, FilterReport, set of truncated indices): the
    template, prompt limit and length limit of `cfg`. Experiments that train on scored pairs
    (E2) call this too, so that they train on exactly the token ids that were scored.
    Identical replies are kept: their CHES is defined (zero)."""
    pairs, report = formatting.tokenize_preferences(
        records,
        tokenizer,
        cfg.template,
        max_prompt_length=min(cfg.max_prompt_length, cfg.max_length - 1),
        max_length=None,
        drop_identical=False,
    )
    pairs, truncated = fit_length(pairs, cfg.max_length, cfg.overflow, report)
    return pairs, report, truncated


def score_file(cfg: ScoringConfig, lm=None, progress: bool = True) -> str:
    """Score every sample of `cfg.data` into `cfg.out`; returns the printed summary.

    Lines go to `<out>.partial` as each batch finishes, and the file is renamed to `out` only
    when every sample is in it, so `out` is never a truncated file. With `cfg.resume`, the
    samples already in `<out>.partial` (from a killed run with the same model, data and
    settings, checked against `<out>.partial.json`) are kept and only the rest are scored."""
    from ld_jax import models

    start = time.perf_counter()
    lm = lm or models.from_pretrained(cfg.model, dtype=cfg.dtype)
    if lm.tokenizer is None:
        raise LdJaxError(f"{cfg.model}: the checkpoint has no tokenizer files")
    records = preference.load_preferences(cfg.data, cfg.columns, cfg.split, cfg.limit)
    pairs, report, truncated = prepare_pairs(records, lm.tokenizer, cfg)
    del records
    main = distributed.is_main_process()
    partial, stamp = Path(cfg.out + ".partial"), Path(cfg.out + ".partial.json")
    key = {
        "scoring": dataclasses.asdict(dataclasses.replace(cfg, resume=False)),
        "pairs": pairs_digest(pairs),
    }
    rows = _resumed_rows(partial, stamp, key) if cfg.resume and main else []
    if cfg.resume and jax.process_count() > 1:
        rows = distributed.gather_rows(rows)  # process 0's, on every process
    done = {int(r["index"]) for r in rows}
    if main:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        files.write_json(stamp, key)
        with open(partial, "w") as f:  # the kept lines of a resumed file, then the new ones
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.writelines(
                json.dumps({"index": i, "skipped": why}) + "\n"
                for i, why in report.skipped
                if i not in done
            )
    todo = [p for p in pairs if p.index not in done]
    # On N processes each scores its share on its own devices (no collectives in the kernel);
    # process 0 gathers the rows at the end and writes the file.
    multi = jax.process_count() > 1
    mine = distributed.process_share(todo, key=lambda p: p.length) if multi else todo
    new_rows = []
    scoring_start = time.perf_counter()
    with open(partial if main else os.devnull, "a") as f:
        columns, batches = MEASURES[cfg.measure]
        for batch in batches(lm, mine, cfg.batch_size, progress=progress and main):
            batch_rows = [
                _score_row(batch, k, truncated, columns) for k in range(len(batch["index"]))
            ]
            if not multi:
                f.writelines(json.dumps(row) + "\n" for row in batch_rows)
                f.flush()
            new_rows += batch_rows
        if multi:
            new_rows = distributed.gather_rows(new_rows)
            f.writelines(json.dumps(row) + "\n" for row in new_rows)
    if main:
        os.replace(partial, cfg.out)
        stamp.unlink()
    rows = [r for r in rows if "skipped" not in r] + new_rows
    scoring_time = time.perf_counter() - scoring_start
    total = time.perf_counter() - start
    resumed = f"; resumed {len(done)} samples from {partial}" if done else ""
    head = (
        f"wrote {cfg.out}: {report.summary()}; truncated {len(truncated)}{resumed}. Scoring took "
        f"{scoring_time:.1f} s ({len(new_rows) / max(scoring_time, 1e-9):.2f} pairs/s), "
        f"{total:.1f} s in all"
    )
    return head + "\n" + summarize(rows, MEASURES[cfg.measure][0])


def _score_row(batch: dict, k: int, truncated: set[int], columns=SCORE_COLUMNS) -> dict:
    index = int(batch["index"][k])
    row = {"index": index, **{key: float(batch[key][k]) for key in columns}}
    row.update(len_chosen=int(batch["len_chosen"][k]), len_rejected=int(batch["len_rejected"][k]))
    row["truncated"] = index in truncated
    return row


def _resumed_rows(partial: Path, stamp: Path, key: dict) -> list[dict]:
    """The complete lines of a partial scores file of the same scoring (model, data,
    settings). A line torn by a kill is dropped."""
    if not partial.is_file():
        raise LdJaxError(f"--resume: no partial scores file {partial} to continue")
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        saved = None
    if saved != json.loads(json.dumps(key)):
        raise LdJaxError(
            f"--resume: {partial} was written with another model, data or settings; delete it or drop --resume"
        )
    rows = []
    for line in partial.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ---------------------------------------------------------------- summary


def summarize(rows: list[dict], columns=SCORE_COLUMNS) -> str:
    """Quantiles of every score, then the correlation of ln_ches with the length difference
    (len_chosen − len_rejected), or for rates the share of pairs with rate < 0 (Wilson 95%)."""
    if not rows:
        return "no scored samples"
    qs = (0, 5, 25, 50, 75, 95, 100)
    lines = [f"{'':<15}" + "".join(f"{'q' + str(q):>12}" for q in qs)]
    for key in columns:
        values = np.array([r[key] for r in rows], np.float64)
        lines.append(f"{key:<15}" + "".join(f"{v:>12.4g}" for v in np.percentile(values, qs)))
    if "rate" in columns:
        k = sum(r["rate"] < 0 for r in rows)
        lo, hi = stats.wilson(k, len(rows))
        lines.append(
            f"rate < 0 (displaced at first order): {k} of {len(rows)} "
            f"({k / len(rows):.1%}, Wilson 95% [{lo:.1%}, {hi:.1%}])"
        )
        return "\n".join(lines)
    ln_ches = np.array([r["ln_ches"] for r in rows])
    diff = np.array([r["len_chosen"] - r["len_rejected"] for r in rows], np.float64)
    if len(rows) > 2 and np.ptp(diff) > 0 and np.ptp(ln_ches) > 0:
        rho = scipy.stats.spearmanr(ln_ches, diff).statistic
        r = scipy.stats.pearsonr(ln_ches, diff).statistic
        lines.append(
            "ln_ches vs length difference (len_chosen - len_rejected): "
            f"Spearman {rho:.3f}, Pearson {r:.3f}"
        )
    else:
        lines.append("ln_ches vs length difference: undefined (too few or constant values)")
    return "\n".join(lines)


# ---------------------------------------------------------------- filtering


def read_scores(path: str) -> tuple[list[dict], dict[int, str]]:
    """A scores .jsonl -> (scored rows, {index: skip reason} of the skipped samples)."""
    if not Path(path).is_file():
        raise LdJaxError(f"scores file not found: {path}")
    rows, skipped = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index = int(row["index"])
            except (ValueError, KeyError, TypeError) as e:
                raise LdJaxError(f"{path} line {n}: not a scores line ({e})") from e
            if "skipped" in row:
                skipped[index] = row["skipped"]
            elif not any(
                all(isinstance(row.get(k), int | float) for k in columns)
                for columns, _ in MEASURES.values()
            ):
                raise LdJaxError(
                    f"{path} line {n}: sample {index} lacks one of {', '.join(SCORE_COLUMNS)} "
                    f"(or of {', '.join(displacement.RATE_KEYS)})"
                )
            else:
                rows.append(row)
    return rows, skipped


def select(values: np.ndarray, cfg: FilterConfig) -> np.ndarray:
    """values [n] -> positions [k] of the selected samples, by ascending value."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    if cfg.keep_lowest is not None:
        return order[: max(1, round(cfg.keep_lowest * n))]
    if cfg.keep_highest is not None:
        return order[n - max(1, round(cfg.keep_highest * n)) :]
    return percentile_window(values, cfg.percentile, cfg.size)


def percentile_window(values: np.ndarray, percentile: float, size: int) -> np.ndarray:
    """values [n] -> positions [size] of the `size` samples whose rank is centred on the
    `percentile`-th percentile, clamped at the ends (0 takes the lowest, 100 the highest), by
    ascending value (paper §5)."""
    n = len(values)
    if size > n:
        raise LdJaxError(f"size {size} exceeds the {n} scored samples")
    order = np.argsort(values, kind="stable")
    centre = round(percentile / 100 * (n - 1))
    start = min(max(centre - size // 2, 0), n - size)
    return order[start : start + size]


def describe_selection(cfg: FilterConfig) -> str:
    if cfg.keep_lowest is not None:
        return f"lowest {cfg.keep_lowest:.4g} by {cfg.by}"
    if cfg.keep_highest is not None:
        return f"highest {cfg.keep_highest:.4g} by {cfg.by}"
    return f"{cfg.size} samples centred on the {cfg.percentile:g}th percentile of {cfg.by}"


def filter_file(cfg: FilterConfig) -> str:
    """Write the selected records of `cfg.data` to `cfg.out` as JSONL in input order, each
    `{index, prompt, chosen, rejected[, reward_chosen, reward_rejected], <by>}`, a file the
    training pipeline reads with the default columns. Returns the printed summary."""
    rows, skipped = read_scores(cfg.scores)
    if not rows:
        raise LdJaxError(f"{cfg.scores}: no scored samples")
    if cfg.by not in rows[0]:
        have = [k for k in rows[0] if k not in ("index", "truncated")]
        raise LdJaxError(f"{cfg.scores} has no {cfg.by} scores (it has {', '.join(have)}): --by")
    values = np.array([r[cfg.by] for r in rows], np.float64)
    if not np.isfinite(values).all():
        raise LdJaxError(f"{cfg.scores}: non-finite {cfg.by} values")
    chosen_rows = [rows[i] for i in select(values, cfg)]
    wanted = {r["index"]: r[cfg.by] for r in chosen_rows}
    found, listed, unlisted = 0, {r["index"] for r in rows} | set(skipped), []
    with files.atomic_path(cfg.out) as tmp, open(tmp, "w") as f:
        for rec in preference.load_preferences(cfg.data, cfg.columns, cfg.split):
            if rec.index not in listed:
                unlisted.append(rec.index)
            if rec.index not in wanted:
                continue
            line = {
                "index": rec.index,
                "prompt": rec.prompt,
                "chosen": rec.chosen,
                "rejected": rec.rejected,
            }
            if rec.reward_chosen is not None or rec.reward_rejected is not None:
                line.update(reward_chosen=rec.reward_chosen, reward_rejected=rec.reward_rejected)
            line[cfg.by] = wanted[rec.index]
            f.write(json.dumps(line) + "\n")
            found += 1
        if unlisted:
            raise LdJaxError(
                f"{cfg.scores} lists {len(listed)} samples, but {cfg.data} has {len(listed) + len(unlisted)}: "
                f"{len(unlisted)} are neither scored nor skipped (first: index {unlisted[0]}); a scoring "
                "that stopped early, or one with --limit? Continue it with `ld-jax ches ... --resume`"
            )
        if found != len(wanted):
            raise LdJaxError(
                f"{cfg.scores} names {len(wanted) - found} sample(s) that {cfg.data} does not have: "
                "were the scores computed from this file?"
            )
    counts = collections.Counter(skipped.values())
    skipped_text = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    head = (
        f"wrote {cfg.out}: kept {found} of {len(rows)} scored samples ({describe_selection(cfg)}); "
        f"skipped at scoring: {skipped_text}\nkept samples:"
    )
    columns = next(c for c, _ in MEASURES.values() if all(k in chosen_rows[0] for k in c))
    return head + "\n" + summarize(chosen_rows, columns)
