"""`ld-jax predictors` (issue #20): displacement predictors against the exact first-order rates.

    run_predictors(PredictorsConfig(...))     # `ld-jax predictors --config FILE.yaml`

Per dataset, composing library calls only:

1. The pairs: `scoring.prepare_pairs` (the template and length limit of `ld-jax ches`), or the
   Persona prompts with single-token responses; a fixed random subset drawn before scoring.
2. The predictors: `ches.score_pairs` (CHES, ln-CHES, edit distance, last-hidden inner
   product, the lengths) and the gradient cosine from `displacement.pair_rates`.
3. The targets: the pair-mode rate (`displacement.pair_rates`), the dataset-mode rate
   (`displacement.dataset_rates` under the configured loss), and the change of ln π(y+|x)
   after one epoch of the loss through the training loop (`train.loop.train`, its
   `init_logps` / `final_logps`).
4. Persona (single-token pairs): the rate restricted to the unconstrained-features model's
   parameters (`displacement.head_rates`) against Theorem 4's closed form
   (`displacement.theorem4_inner`).

Each stage is cached under `out_dir/cache` by a key of everything that changes it, so a run
split into pieces (`only=[name]`) resumes where it stopped. `report` writes the outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ld_jax import ches, displacement, models, scoring
from ld_jax.data import preference
from ld_jax.data.formatting import TokenizedPair
from ld_jax.digest import fingerprint, pairs_digest, params_digest
from ld_jax.errors import LdJaxError
from ld_jax.experiments import protocol
from ld_jax.experiments.predictors import report
from ld_jax.experiments.predictors.config import DatasetConfig, PredictorsConfig
from ld_jax.files import write_json
from ld_jax.models.config import result_fields
from ld_jax.train import loop


def dataset_pairs(d: DatasetConfig, tokenizer) -> tuple[list[TokenizedPair], dict]:
    """The dataset's usable pairs, then its random subset of `d.size` (in index order)."""
    if d.kind == "persona":
        from ld_jax.experiments.persona import run as persona

        records = persona.load_records(d.source)[: d.limit]
        prompts, fmt = persona.encode_prompts(tokenizer, [r["question"] for r in records], "auto")
        words = [w for pair in d.persona_pairs for w in pair]
        ids = {w: v["id"] for w, v in persona.resolve_tokens(tokenizer, words, {}).items()}
        pairs = []
        for i, prompt in enumerate(prompts):
            plus, minus = d.persona_pairs[i % len(d.persona_pairs)]
            pairs.append(TokenizedPair(i, prompt, [ids[plus]], [ids[minus]]))
        info = {"records": len(records), "usable": len(pairs), "format": fmt}
    else:
        records = preference.load_preferences(d.source, limit=d.limit)
        cfg = scoring.ScoringConfig(
            "", d.source, "", d.max_length, d.max_prompt_length, d.overflow, d.template
        )
        scored, filters, truncated = scoring.prepare_pairs(records, tokenizer, cfg)
        pairs = [p for p in scored if p.chosen_ids != p.rejected_ids]
        info = {
            "records": len(records),
            "usable": len(pairs),
            "filters": filters.summary(),
            "identical_left_out": len(scored) - len(pairs),
            "truncated": len(truncated),
        }
    if d.size is not None and d.size < len(pairs):
        rows = np.sort(np.random.default_rng(d.seed).choice(len(pairs), d.size, replace=False))
        pairs = [pairs[k] for k in rows]
    if not pairs:
        raise LdJaxError(f"dataset {d.name}: no usable pairs")
    info["pairs"] = len(pairs)
    return pairs, info


def predictor_values(cfg: PredictorsConfig, lm, pairs, cache: Path, key: str, log) -> dict:
    """CHES scores and the pair-mode rates of `pairs` `{name: [n]}` (cached)."""
    scores = protocol.cached_arrays(
        cache / f"scores-{key}.npz",
        lambda: ches.score_pairs(lm, pairs, cfg.score_batch_size, progress=cfg.progress),
    )
    start = time.perf_counter()
    rates = protocol.cached_arrays(
        cache / f"rates-{fingerprint(key, cfg.rate_layout)}.npz",
        lambda: displacement.pair_rates(
            lm, pairs, cfg.rate_batch_size, progress=cfg.progress, layout=cfg.rate_layout
        ),
    )
    log(f"pair rates: {time.perf_counter() - start:.1f} s (0 when cached)")
    out = {k: np.asarray(v, np.float64) for k, v in {**scores, **rates}.items()}
    out["len_diff"] = out["len_chosen"] - out["len_rejected"]
    out["grad_cosine"] = out["cross"] / np.sqrt(out["pos_sq"] * out["neg_sq"])
    out["pair_rate"] = out["rate"]
    return out


def train_change(cfg: PredictorsConfig, lm, pairs, workdir: Path) -> dict[str, np.ndarray]:
    """One epoch of `cfg.loss` with `cfg.optimizer` on all `pairs` through the training loop
    -> ln π(y±|x) before and after `[n, 2]`, in `pairs` order."""
    tc = protocol.train_config(
        cfg,
        workdir,
        cfg.optimizer.lr,
        seed=cfg.seed,
        loss=cfg.loss,
        checkpoint_every=0,
        resume=False,
        data=loop.DataConfig(max_length=None, pad_to_multiple=32),
    )
    result = loop.train(tc, model=lm, pairs=pairs)
    return {"init_logps": result.init_logps, "final_logps": result.final_logps}


def run_dataset(cfg: PredictorsConfig, lm, d: DatasetConfig, cache: Path, log) -> dict:
    """Every predictor and target of one dataset `{name: [n]}` plus its info (cached stages)."""
    stages = protocol.Stages(log)
    with stages(f"{d.name}: pairs"):
        pairs, info = dataset_pairs(d, lm.tokenizer)
    model = fingerprint(cfg.model, result_fields(lm.config), params_digest(lm.params, sample=64))
    key = fingerprint(model, pairs_digest(pairs))
    log(f"{d.name}: {info}")
    with stages(f"{d.name}: predictors and pair rates"):
        values = predictor_values(cfg, lm, pairs, cache, key, log)
    with stages(f"{d.name}: dataset rates"):
        values["dataset_rate"] = protocol.cached_arrays(
            cache / f"dataset-{fingerprint(key, cfg.loss)}.npz",
            lambda: {"rate": displacement.dataset_rates(lm, pairs, cfg.loss, cfg.batch_size)},
        )["rate"]
    with stages(f"{d.name}: one epoch of {cfg.loss.name}"):
        tkey = fingerprint(key, cfg.loss, cfg.optimizer, cfg.batch_size, cfg.seed)
        trained = protocol.cached_arrays(
            cache / f"train-{tkey}.npz",
            lambda: train_change(cfg, lm, pairs, cache / f"run-{tkey}"),
        )
        values["measured_change"] = trained["final_logps"][:, 0] - trained["init_logps"][:, 0]
        values["measured_change_rejected"] = (
            trained["final_logps"][:, 1] - trained["init_logps"][:, 1]
        )
    if d.kind == "persona":
        with stages(f"{d.name}: Theorem 4 check"):
            check = protocol.cached_arrays(
                cache / f"theorem4-{key}.npz",
                lambda: {
                    "head_rate": displacement.head_rates(lm, pairs, cfg.rate_batch_size)["rate"],
                    "theorem4_inner": displacement.theorem4_inner(lm, pairs)["inner"],
                },
            )
            values.update({k: np.asarray(v) for k, v in check.items()})
    values["index"] = np.array([p.index for p in pairs])
    info["stage_seconds"] = stages.seconds
    return {"info": info, "values": {k: np.asarray(v, np.float64) for k, v in values.items()}}


def run_predictors(cfg: PredictorsConfig) -> dict:
    """The benchmark end to end (or the datasets of `cfg.only`, then the report of every
    dataset already computed); writes results.json, table.md and the scatter PNGs."""
    log = protocol.Log("predictors", cfg.progress)
    out = Path(cfg.out_dir)
    lm = models.from_pretrained(cfg.model, dtype="float32")
    if lm.tokenizer is None:
        raise LdJaxError(f"{cfg.model}: the checkpoint has no tokenizer files")
    done = {}
    for d in cfg.datasets:
        if cfg.only and d.name not in cfg.only:
            continue
        record = run_dataset(cfg, lm, d, out / "cache", log)
        write_json(out / "datasets" / f"{d.name}.json", {"config": d, **record})
        done[d.name] = record
    for d in cfg.datasets:  # the ones computed by earlier pieces
        path = out / "datasets" / f"{d.name}.json"
        if d.name not in done and path.is_file():
            record = json.loads(path.read_text())
            record["values"] = {k: np.asarray(v, np.float64) for k, v in record["values"].items()}
            done[d.name] = record
    result = report.write_outputs(cfg, done, out)
    result["machine"] = protocol.machine()
    write_json(out / "results.json", result)
    return result
