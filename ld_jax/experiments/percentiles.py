"""Experiment E2 (SPEC §6, paper Section 5, Figure 2 and Appendix J.2): CHES identifies the
samples that cause likelihood displacement.

    run_percentiles(PercentilesConfig(...))     # `ld-jax percentiles --config FILE.yaml`

1. Score every pair of the dataset with CHES, the normalised edit distance and the last-hidden
   inner product (`scoring.score_file`, the code behind `ld-jax ches`), with the same template
   and length limit that training uses (`scoring.prepare_pairs`), so the windows are
   windows of exactly the token ids that are trained on.
2. For each measure and percentile, take the `window` pairs whose rank is centred on it
   (`scoring.percentile_window`, the code behind `ld-jax filter --percentile-window`).
3. Compute ln π_init(y±|x) once for the union of all windows (`train.loop.train` with
   `max_steps=0`, which caches them), then train one epoch of DPO/IPO on every window and seed
   from the same initial model through the one training loop, handing it those log-probs.
4. Record the change of the mean ln π(y+|x) and ln π(y−|x) over the window (the loop's final
   evaluation) and write the tables, Figure 2 and samples.md (`percentiles_report`).

Caching: scores and initial log-probs are keyed by the token ids and the model, so a re-run
skips them; every finished run is saved under `out_dir/runs/<fingerprint>/` and skipped on a
re-run, so an interrupted command resumes (an interrupted run starts again; its loop directory
holds at most a final checkpoint, which is deleted once the run is recorded).

Runs are executed one after another: on CPU the step is already compute-bound, and the loop
reuses its jitted step across runs (one compilation per padded length), so batching seeds
would not be faster there; the seeds only change the order of the batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from ld_jax import files
from ld_jax import host_memory, scoring
from ld_jax.data import preference
from ld_jax.digest import fingerprint, pairs_digest, params_digest
from ld_jax.errors import LdJaxError
from ld_jax.report import write_json
from ld_jax.losses import LossConfig
from ld_jax.models.core import result_fields
from ld_jax.train import loop, sharding
from ld_jax.train.optim import OptimizerConfig

MEASURES = scoring.SCORE_COLUMNS  # ches, ln_ches, edit_distance, last_hidden_ip


@dataclasses.dataclass(frozen=True)
class PercentilesConfig:
    """One `ld-jax percentiles` experiment (paper values as defaults, App. J.2).

    data: the loop's DataConfig; `data.max_length` bounds prompt + response tokens and longer
        responses are truncated (`overflow`, as in `ld-jax ches`); prompts over
        `data.max_prompt_length` are dropped. Pairs whose (truncated) replies are identical are
        left out: DPO's gradient on them is zero.
    batch_size: pairs per optimizer update, run as `optimizer.grad_accum_steps` micro-batches.
    lr_grid: if not empty, the lr is the largest of the grid for which every search run (seed 0
        of each window of `measures[0]`) finishes with a finite loss lower over its window than
        at the start; those runs are kept as results. Empty: `optimizer.lr` as given.
    reuse_freed_memory: as in PersonaConfig (host_memory.keep_freed_memory): faster steps for
        small models; turn it off for models whose step buffers fragment the single heap.
    """

    model: str = "smollm2-135m-instruct"
    title: str = ""  # model label in tables and plots; defaults to `model`
    data: loop.DataConfig = dataclasses.field(default_factory=lambda: loop.DataConfig(max_length=512))
    overflow: str = "truncate"  # truncate | skip (see scoring)
    measures: tuple[str, ...] = ("ches", "edit_distance", "last_hidden_ip")
    percentiles: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    window: int = 512
    seeds: int = 3
    score_batch_size: int = 8
    batch_size: int = 32
    compute_dtype: str = "float32"
    remat: bool = False
    seq_chunk: int | None = None
    loss: LossConfig = dataclasses.field(default_factory=lambda: LossConfig("dpo", beta=0.1))
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig("rmsprop", lr=1e-7))
    lr_grid: tuple[float, ...] = ()
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
    keep_checkpoints: bool = False  # keep each run's final orbax checkpoint (about 2x the params)
    samples_shown: int = 3  # highest and lowest CHES pairs in samples.md (paper Tables 14/15)
    out_dir: str = "results/percentiles"
    progress: bool = True
    reuse_freed_memory: bool = True

    def __post_init__(self):
        # YAML 1.1 reads 1e-7 as a string, and lists do not pass through the loader's float cast.
        object.__setattr__(self, "lr_grid", tuple(float(x) for x in self.lr_grid))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if bad := [m for m in self.measures if m not in MEASURES]:
            raise ValueError(f"unknown measure(s) {bad}; choose from {', '.join(MEASURES)}")
        if not self.measures or not self.percentiles:
            raise ValueError("need at least one measure and one percentile")
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {self.percentiles}")
        if self.window < 1 or self.seeds < 1 or self.batch_size < 1:
            raise ValueError("window, seeds and batch_size must be >= 1")
        if self.overflow not in scoring.OVERFLOW:
            raise ValueError(f"overflow must be one of {scoring.OVERFLOW}, got {self.overflow!r}")
        if self.data.max_length is None:
            raise ValueError("data.max_length is required (the scores' length limit)")


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
    return fingerprint(cfg.model, result_fields(lm.config), cfg.compute_dtype, params_digest(lm.params, sample=64))


def scoring_config(cfg: PercentilesConfig, out: str) -> scoring.ScoringConfig:
    d = cfg.data
    return scoring.ScoringConfig(
        model=cfg.model, data=d.source, out=out, max_length=d.max_length,
        max_prompt_length=d.max_prompt_length or d.max_length, overflow=cfg.overflow,
        template=d.template, batch_size=cfg.score_batch_size, dtype=cfg.compute_dtype,
        columns=d.columns, split=d.split, limit=d.limit,
    )  # fmt: skip


def training_pool(records, tokenizer, cfg: PercentilesConfig):
    """Records -> (pairs trained and ranked: the scored pairs without identical replies,
    FilterReport with the counts)."""
    pairs, report, _ = scoring.prepare_pairs(records, tokenizer, scoring_config(cfg, ""))
    pool = []
    for p in pairs:
        if p.chosen_ids == p.rejected_ids:
            report.skip(p.index, "identical_responses")
        else:
            pool.append(p)
    report.kept = len(pool)
    if len(pool) < cfg.window:
        raise LdJaxError(f"only {len(pool)} usable pairs ({report.summary()}) for windows of {cfg.window}")
    return pool, report


def pool_scores(cfg: PercentilesConfig, lm, pool, cache: Path) -> dict[str, np.ndarray]:
    """Scores of every pool pair, `{measure: [n]}` in pool order, from `cache` or by scoring the
    dataset (written to a temporary name first, so a killed scoring is never taken as done)."""
    path = cache / f"scores-{fingerprint(model_digest(cfg, lm), pairs_digest(pool))}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".partial")
        print(scoring.score_file(scoring_config(cfg, str(tmp)), lm=lm, progress=cfg.progress))
        tmp.rename(path)
    rows = {r["index"]: r for r in scoring.read_scores(str(path))[0]}
    if missing := [p.index for p in pool if p.index not in rows]:
        raise LdJaxError(f"{path} lacks scores of {len(missing)} pairs (first: {missing[:5]}); delete it")
    keys = (*MEASURES, "len_chosen", "len_rejected")
    return {k: np.array([rows[p.index][k] for p in pool], np.float64) for k in keys}


def windows(scores: dict[str, np.ndarray], cfg: PercentilesConfig) -> dict[tuple[str, float], np.ndarray]:
    """(measure, percentile) -> pool positions `[window]` of its window, ascending."""
    return {
        (m, p): np.sort(scoring.percentile_window(scores[m], p, cfg.window))
        for m in cfg.measures for p in cfg.percentiles
    }  # fmt: skip


def train_config(cfg: PercentilesConfig, output_dir: Path, seed: int, lr: float, **kw) -> loop.TrainConfig:
    return loop.TrainConfig(
        model=cfg.model, output_dir=str(output_dir), batch_size=cfg.batch_size, num_epochs=1,
        seed=seed, compute_dtype=cfg.compute_dtype, remat=cfg.remat, seq_chunk=cfg.seq_chunk,
        reference="cached", checkpoint_every=0, keep_checkpoints=1, resume=True, progress=cfg.progress,
        data=cfg.data, loss=cfg.loss, optimizer=dataclasses.replace(cfg.optimizer, lr=lr), mesh=cfg.mesh,
        **kw,
    )  # fmt: skip


def initial_logps(cfg: PercentilesConfig, lm, pairs, cache: Path) -> np.ndarray:
    """ln π_init(y±|x) `[len(pairs), 2]`: the loop's cached reference pass, without steps."""
    tc = train_config(cfg, cache / "init_logps", 0, cfg.optimizer.lr, max_steps=0, final_eval=False)
    return loop.train(tc, model=lm, pairs=pairs).init_logps


class Runner:
    """Trains single (measure, percentile, seed, lr) runs through the loop, keeping each finished
    run's record as `<store>/<run name>/run.json`."""

    def __init__(self, cfg, lm, pool, union, init, wins, store: Path):
        self.cfg, self.lm, self.pool, self.wins, self.store = cfg, lm, pool, wins, store
        self.row = {int(i): k for k, i in enumerate(union)}  # pool position -> row of `init`
        self.init = init

    def done(self, run: Run) -> dict | None:
        path = self.store / run.name / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def __call__(self, run: Run, search: bool = False) -> dict:
        """Train `run` (or return its record). In the lr `search`, a run whose loss turns
        non-finite is recorded as failed (its lr is unstable) instead of raising."""
        if rec := self.done(run):
            return rec
        cfg, t0 = self.cfg, time.perf_counter()
        positions = self.wins[(run.measure, run.percentile)]
        pairs = [self.pool[i] for i in positions]
        ref = self.init[[self.row[int(i)] for i in positions]]
        out = self.store / run.name
        tc = train_config(cfg, out, run.seed, run.lr)
        try:
            result = loop.train(tc, model=self.lm, pairs=pairs, ref_logps=ref)
            s = result.summary
            rec = {k: s[k] for k in ("loss_init", "loss_final", "loss_decreased", "mean_chosen_logp_init",
                                     "mean_chosen_logp_change", "mean_rejected_logp_change", "fraction_pairs_displaced")}
            rec["first_step"] = {k: result.metrics[0][k] for k in ("loss", "chosen_logp_change")}
            rec["error"] = None
        except LdJaxError as e:
            if not search or "non-finite" not in str(e):
                raise
            rec = {"error": str(e)}
        rec.update(dataclasses.asdict(run), indices=[self.pool[i].index for i in positions], seconds=time.perf_counter() - t0)
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        files.write_text(out / "run.json", json.dumps(rec, indent=1))
        return rec

    def many(self, runs: list[Run], desc: str, search: bool = False) -> list[dict]:
        todo = [r for r in runs if self.done(r) is None]
        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=desc, unit="run", disable=not self.cfg.progress)
        recs = {r: self.done(r) for r in runs}
        for r in todo:
            recs[r] = self(r, search)
            bar.update(1)
            bar.set_postfix(last=r.name, s=f"{recs[r]['seconds']:.0f}")
        bar.close()
        return [recs[r] for r in runs]


def stable(recs: list[dict]) -> bool:
    return all(r["error"] is None and np.isfinite(r["loss_final"]) and r["loss_decreased"] for r in recs)


def run_percentiles(cfg: PercentilesConfig) -> dict:
    """E2 end to end; writes results.json, table.md, figure2.png and samples.md to `out_dir`
    and returns the results."""
    from ld_jax import models
    from ld_jax.experiments import percentiles_report

    if cfg.reuse_freed_memory:
        host_memory.keep_freed_memory()  # XLA:CPU's per-step temporaries are reused instead of page-faulted in
    stages, clock = {}, time.perf_counter()

    def stage(name):
        nonlocal clock
        now = time.perf_counter()
        stages[name] = round(now - clock, 2)
        clock = now
        print(f"[percentiles] {name}: {stages[name]:.1f} s")

    out = Path(cfg.out_dir)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    lm = models.from_pretrained(cfg.model, dtype="float32")  # fp32 master weights; the loop casts
    if lm.tokenizer is None:
        raise LdJaxError(f"{cfg.model}: the checkpoint has no tokenizer files")
    stage("load model")
    d = cfg.data
    records = preference.load_preferences(d.source, d.columns, d.split, d.limit)
    pool, report = training_pool(records, lm.tokenizer, cfg)
    stage("read and tokenize")
    scores = pool_scores(cfg, lm, pool, cache)
    stage("scores")
    wins = windows(scores, cfg)
    union = np.unique(np.concatenate(list(wins.values())))
    init = initial_logps(cfg, lm, [pool[i] for i in union], cache)
    stage("initial log-probs")

    key = fingerprint(model_digest(cfg, lm), pairs_digest(pool), cfg.loss, dataclasses.replace(cfg.optimizer, lr=0),
                      cfg.batch_size, cfg.compute_dtype, cfg.seq_chunk, cfg.window, cfg.data.pad_to_multiple)
    runner = Runner(cfg, lm, pool, union, init, wins, out / "runs" / key)
    search, lr, reused = [], cfg.optimizer.lr, []
    for lr in sorted(cfg.lr_grid, reverse=True):
        recs = runner.many([Run(cfg.measures[0], p, 0, lr) for p in cfg.percentiles], f"lr search {lr:g}", search=True)
        ok = stable(recs)
        search.append({"lr": lr, "runs": len(recs), "stable": ok, "errors": [r["error"] for r in recs if r["error"]]})
        if ok:
            reused = recs
            break
    else:
        if cfg.lr_grid:
            print(f"no lr in {cfg.lr_grid} was stable in all search runs; using the smallest")
    stage("lr search")
    runs = [Run(m, p, s, lr) for m in cfg.measures for p in cfg.percentiles for s in range(cfg.seeds)]
    recs = runner.many(runs, f"{cfg.loss.name} lr {lr:g}")
    if failed := [r for r in recs if r["error"]]:  # search runs of an lr that no lr beat
        raise LdJaxError(f"{len(failed)} run(s) had a non-finite loss at lr {lr:g}: {failed[0]['error']}")
    stage("training runs")

    meta = {
        "model": cfg.model, "title": cfg.title or cfg.model, "data": d.source, "pool": len(pool),
        "data_filter": report.summary(), "lr": lr, "lr_search": search, "reused_search_runs": len(reused),
        "union_pairs": len(union), "run_store": str(runner.store), "stage_seconds": stages,
        "machine": {"cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": jax.device_count()},
    }
    result = percentiles_report.write_outputs(cfg, meta, pool, scores, wins, recs, records)
    stage("report")  # meta holds `stages` itself, so results.json gets this stage too
    write_json(out / "results.json", result)
    return result
