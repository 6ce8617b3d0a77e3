"""Experiment E2 (SPEC §6, paper Section 5, Figure 2 and Appendix J.2): CHES identifies the
samples that cause likelihood displacement.

    run_percentiles(PercentilesConfig(...))     # `ld-jax percentiles --config FILE.yaml`

1. Score every pair of the dataset with CHES, the normalised edit distance and the last-hidden
   inner product (`ches.score_pairs`, the kernel behind `ld-jax ches`), with the same template
   and length limit that training uses (`scoring.prepare_pairs`), so the windows are
   windows of exactly the token ids that are trained on.
2. For each measure and percentile, take the `window` pairs whose rank is centred on it
   (`scoring.percentile_window`, the code behind `ld-jax filter --percentile-window`).
3. Compute ln π_init(y±|x) once for the union of all windows (`train.reference`), then train
   one epoch of DPO/IPO on every window and seed from the same initial model through the one
   training loop, handing it those log-probs.
4. Record the change of the mean ln π(y+|x) and ln π(y−|x) over the window (the loop's final
   evaluation) and write the tables, Figure 2 and samples.md (`percentiles.report`).

Library calls: `ches.score_pairs` and `train.reference.reference_logps` (both cached by key),
`train.loop.train` per run, `protocol.RunStore` (every finished run is kept under
`out_dir/runs/<fingerprint>/`, so an interrupted command resumes), `protocol.lr_search` with
the rule "falls_overall", `protocol.Stages`/`Log`/`machine`.

Runs are executed one after another: on CPU the step is already compute-bound, and the loop
reuses its jitted step across runs (one compilation per padded length), so batching seeds
would not be faster there; the seeds only change the order of the batches.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from ld_jax import ches, host_memory, models, scoring
from ld_jax.data import preference
from ld_jax.digest import fingerprint, pairs_digest, params_digest
from ld_jax.errors import LdJaxError
from ld_jax.experiments import protocol
from ld_jax.experiments.percentiles import report as percentiles_report
from ld_jax.experiments.percentiles.config import MEASURES, PercentilesConfig
from ld_jax.files import write_json
from ld_jax.models.config import result_fields
from ld_jax.train import loop, reference


@dataclasses.dataclass(frozen=True)
class Run:
    measure: str
    percentile: float
    seed: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.measure}_p{self.percentile:g}_s{self.seed}_lr{self.lr:g}"


def model_digest(cfg: PercentilesConfig, lm) -> str:
    """The model's name, architecture and a sample of every weight (tells checkpoints apart
    without hashing all of them)."""
    # switching a speed option (remat, unrolled layers) keeps the cached scores, log-probs and runs
    return fingerprint(
        cfg.model, result_fields(lm.config), cfg.compute_dtype, params_digest(lm.params, sample=64)
    )


def scoring_config(cfg: PercentilesConfig) -> scoring.ScoringConfig:
    d = cfg.data
    return scoring.ScoringConfig(
        model=cfg.model,
        data=d.source,
        out="",
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length or d.max_length,
        overflow=cfg.overflow,
        template=d.template,
        batch_size=cfg.score_batch_size,
        dtype=cfg.compute_dtype,
        columns=d.columns,
        split=d.split,
        limit=d.limit,
    )


def training_pool(records, tokenizer, cfg: PercentilesConfig):
    """Records -> (the scored pairs, as `ld-jax ches` scores them; the pairs trained and ranked:
    those without identical replies; FilterReport with the counts)."""
    scored, report, _ = scoring.prepare_pairs(records, tokenizer, scoring_config(cfg))
    pool = []
    for p in scored:
        if p.chosen_ids == p.rejected_ids:
            report.skip(p.index, "identical_responses")
        else:
            pool.append(p)
    report.kept = len(pool)
    if len(pool) < cfg.window:
        raise LdJaxError(
            f"only {len(pool)} usable pairs ({report.summary()}) for windows of {cfg.window}"
        )
    return scored, pool, report


def pool_scores(cfg: PercentilesConfig, lm, scored, pool, cache: Path) -> dict[str, np.ndarray]:
    """Scores of every pool pair, `{measure: [n]}` in pool order. All scored pairs run through
    the kernel, as in `ld-jax ches`, so that batches (and so the last bits) are the same."""
    key = fingerprint(model_digest(cfg, lm), pairs_digest(scored), cfg.score_batch_size)
    scores = protocol.cached_arrays(
        cache / f"scores-{key}.npz",
        lambda: ches.score_pairs(lm, scored, cfg.score_batch_size, progress=cfg.progress),
    )
    row = {p.index: k for k, p in enumerate(scored)}
    keys = (*MEASURES, "len_chosen", "len_rejected")
    return {k: np.asarray(scores[k], np.float64)[[row[p.index] for p in pool]] for k in keys}


def windows(
    scores: dict[str, np.ndarray], cfg: PercentilesConfig
) -> dict[tuple[str, float], np.ndarray]:
    """(measure, percentile) -> pool positions `[window]` of its window, ascending."""
    return {
        (m, p): np.sort(scoring.percentile_window(scores[m], p, cfg.window))
        for m in cfg.measures
        for p in cfg.percentiles
    }


def train_config(
    cfg: PercentilesConfig, output_dir: Path, seed: int, lr: float, **kw
) -> loop.TrainConfig:
    return protocol.train_config(
        cfg,
        output_dir,
        lr,
        seed=seed,
        compute_dtype=cfg.compute_dtype,
        remat=cfg.remat,
        reference="cached",
        checkpoint_every=0,
        resume=True,
        data=cfg.data,
        loss=cfg.loss,
        mesh=cfg.mesh,
        **kw,
    )


def initial_logps(cfg: PercentilesConfig, lm, pairs, cache: Path) -> np.ndarray:
    """ln π_init(y±|x) `[len(pairs), 2]`, batched as the loop batches its reference pass."""
    tc = train_config(cfg, cache, 0, cfg.optimizer.lr)
    return reference.like_training(tc, lm, pairs, cache / "init_logps", cfg.progress)


def train_run(
    cfg: PercentilesConfig, lm, pairs, ref, run: Run, workdir: Path, search: bool
) -> dict:
    """One epoch on one window -> its record. In the lr `search`, a run whose loss turns
    non-finite is recorded as failed (its lr is unstable) instead of raising."""
    t0 = time.perf_counter()
    try:
        result = loop.train(
            train_config(cfg, workdir, run.seed, run.lr), model=lm, pairs=pairs, ref_logps=ref
        )
        s = result.summary
        rec = {
            k: s[k]
            for k in (
                "loss_init",
                "loss_final",
                "loss_decreased",
                "mean_chosen_logp_init",
                "mean_chosen_logp_change",
                "mean_rejected_logp_change",
                "fraction_pairs_displaced",
            )
        }
        rec["first_step"] = {k: result.metrics[0][k] for k in ("loss", "chosen_logp_change")}
        rec["error"] = None
    except LdJaxError as e:
        if not search or "non-finite" not in str(e):
            raise
        rec = {"error": str(e)}
    rec.update(
        dataclasses.asdict(run), indices=[p.index for p in pairs], seconds=time.perf_counter() - t0
    )
    if not cfg.keep_checkpoints:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    return rec


def run_percentiles(cfg: PercentilesConfig) -> dict:
    """E2 end to end; writes results.json, table.md, figure2.png and samples.md to `out_dir`
    and returns the results."""
    if cfg.reuse_freed_memory:
        host_memory.keep_freed_memory()  # XLA:CPU's per-step temporaries are reused instead of page-faulted in
    log = protocol.Log("percentiles")
    stages = protocol.Stages(log)
    out = Path(cfg.out_dir)
    cache = out / "cache"
    with stages("load model"):
        lm = models.from_pretrained(
            cfg.model, dtype="float32"
        )  # fp32 master weights; the loop casts
        if lm.tokenizer is None:
            raise LdJaxError(f"{cfg.model}: the checkpoint has no tokenizer files")
    with stages("read and tokenize"):
        d = cfg.data
        records = preference.load_preferences(d.source, d.columns, d.split, d.limit)
        scored, pool, report = training_pool(records, lm.tokenizer, cfg)
    with stages("scores"):
        scores = pool_scores(cfg, lm, scored, pool, cache)
    with stages("initial log-probs"):
        wins = windows(scores, cfg)
        union = np.unique(np.concatenate(list(wins.values())))
        init = initial_logps(cfg, lm, [pool[i] for i in union], cache)
    row = {int(i): k for k, i in enumerate(union)}  # pool position -> row of `init`

    key = fingerprint(
        model_digest(cfg, lm),
        pairs_digest(pool),
        cfg.loss,
        dataclasses.replace(cfg.optimizer, lr=0),
        cfg.batch_size,
        cfg.compute_dtype,
        cfg.seq_chunk,
        cfg.window,
        cfg.data.pad_to_multiple,
    )
    store = protocol.RunStore(out / "runs" / key)

    def train_all(runs: list[Run], desc: str, search: bool = False) -> list[dict]:
        def one(run: Run) -> dict:
            positions = wins[(run.measure, run.percentile)]
            ref = init[[row[int(i)] for i in positions]]
            return train_run(
                cfg, lm, [pool[i] for i in positions], ref, run, store.workdir(run.name), search
            )

        return store.many([(r.name, lambda r=r: one(r)) for r in runs], desc, cfg.progress)

    with stages("lr search"):
        chosen, trials = protocol.lr_search(
            cfg.lr_grid,
            lambda lr: train_all(
                [Run(cfg.measures[0], p, 0, lr) for p in cfg.percentiles],
                f"lr search {lr:g}",
                search=True,
            ),
            "falls_overall",
            curve=lambda r: [r.get("loss_init", np.nan), r.get("loss_final", np.nan)],
        )
        search = [
            {
                "lr": lr,
                "runs": len(recs),
                "stable": ok,
                "errors": [r["error"] for r in recs if r["error"]],
            }
            for lr, recs, ok in trials
        ]
        if cfg.lr_grid and chosen is None:
            print(f"no lr in {cfg.lr_grid} was stable in all search runs; using the smallest")
        lr = (
            chosen
            if chosen is not None
            else (min(cfg.lr_grid) if cfg.lr_grid else cfg.optimizer.lr)
        )
        reused = next((recs for _, recs, ok in trials if ok), [])
    with stages("training runs"):
        runs = [
            Run(m, p, s, lr)
            for m in cfg.measures
            for p in cfg.percentiles
            for s in range(cfg.seeds)
        ]
        recs = train_all(runs, f"{cfg.loss.name} lr {lr:g}")
        if failed := [r for r in recs if r["error"]]:  # search runs of an lr that no lr beat
            raise LdJaxError(
                f"{len(failed)} run(s) had a non-finite loss at lr {lr:g}: {failed[0]['error']}"
            )

    meta = {
        "model": cfg.model,
        "title": cfg.title or cfg.model,
        "data": d.source,
        "pool": len(pool),
        "data_filter": report.summary(),
        "lr": lr,
        "lr_search": search,
        "reused_search_runs": len(reused),
        "union_pairs": len(union),
        "run_store": str(store.root),
        "stage_seconds": stages.seconds,
        "machine": protocol.machine(),
    }
    with stages(
        "report"
    ):  # meta holds `stages.seconds` itself, so results.json gets this stage too
        result = percentiles_report.write_outputs(cfg, meta, pool, scores, wins, recs, records)
    write_json(out / "results.json", result)
    return result
