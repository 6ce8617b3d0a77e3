"""E3's starting model: the refusal warm-up (stage 2 of `unalign.run`), and the pieces every
stage shares: refusal rates by sampling and judging, tokenisation of E3's pairs, and the
training-loop config of one run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from ld_jax import files, generate, judge, stats
from ld_jax.data import formatting, preference
from ld_jax.digest import fingerprint
from ld_jax.experiments import protocol
from ld_jax.experiments.unalign.config import UnalignConfig, refusal_texts
from ld_jax.losses import LossConfig
from ld_jax.models.loading import load_param_tree, save_param_tree
from ld_jax.train import loop


def refusal_rates(
    cfg: UnalignConfig, lm, prompts, judge_fn, seeds, desc: str, log, temperature=None
) -> dict:
    """Sample one reply per prompt and seed (cfg.eval; `temperature` overrides its temperature)
    and judge it -> {"rates": [per seed], "mean", "unparsable": [per seed], "replies": seed-0
    [(text, verdict)] in prompt order, "refused": [per seed][per prompt] 1/0 (None if
    unparsable), "bootstrap95": the mean's interval resampling prompts}."""
    texts, rates, unparsable, replies, refused = [p.text for p in prompts], [], [], [], []
    for seed in seeds:
        t0 = time.time()
        sampling = generate.SamplingConfig(
            max_new_tokens=cfg.eval.max_new_tokens,
            seed=seed,
            temperature=cfg.eval.temperature if temperature is None else temperature,
            batch_size=cfg.eval.batch_size,
        )
        out = [
            s.text
            for s in generate.generate_text(
                lm, texts, sampling, cfg.template, progress=progress_bar(cfg, f"{desc} seed {seed}")
            )
        ]
        verdicts = judge_fn(texts, out)
        summary = judge.summarize(verdicts)
        rates.append(
            float("nan") if summary["refusal_rate"] is None else summary["refusal_rate"]
        )  # all unparsable
        unparsable.append(summary["unparsable"])
        refused.append(
            [None if v.label == "unparsable" else int(v.label == "refusal") for v in verdicts]
        )
        if not replies:
            replies = [(t, v.label) for t, v in zip(out, verdicts)]
        log(f"{desc} seed {seed}: refusal rate {rates[-1]:.3f} ({time.time() - t0:.0f} s)")
    return {
        "rates": rates,
        "mean": float(np.mean(rates)),
        "unparsable": unparsable,
        "replies": replies,
        "refused": refused,
        "bootstrap95": prompt_bootstrap(refused),
    }


def across_seeds(records: list[dict]) -> dict:
    """One condition's runs, one per training seed -> {"seeds", "train" / "test": {"rates": the
    mean over evaluation seeds per training seed, "mean", "bootstrap95": the prompt bootstrap
    over every (training seed, evaluation seed) reply}, "logp_chosen_change" and
    "logp_rejected_change": per training seed}."""
    out = {"seeds": [r.get("seed") for r in records]}
    for split in ("train", "test"):
        rates = [r[split]["mean"] for r in records]
        refused = [row for r in records for row in r[split].get("refused", [])]
        out[split] = {
            "rates": rates,
            "mean": float(np.mean(rates)),
            "bootstrap95": prompt_bootstrap(refused),
        }
    for key in ("logp_chosen_change", "logp_rejected_change"):
        out[key] = [r[key] for r in records]
    return out


def prompt_bootstrap(refused) -> list[float]:
    """Percentile-bootstrap 95% interval of the refusal rate averaged over seeds, resampling
    prompts (each prompt keeps its replies of every seed; unparsable replies left out)."""
    table = np.array([[np.nan if x is None else x for x in row] for row in refused], float).T
    if table.size == 0:
        return [float("nan"), float("nan")]

    def rate(rows):  # rows [prompts, seeds] -> the mean over seeds of each seed's rate
        return float(np.nanmean(np.nanmean(rows, axis=0)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-unparsable resample
        return list(stats.bootstrap(rate, table))


def tokenize(cfg: UnalignConfig, tok, records, drop_identical=True):
    """Token ids for training; pairs over `cfg.max_length` tokens are left out and counted."""
    return formatting.tokenize_preferences(
        records,
        tok,
        cfg.template,
        max_prompt_length=None,
        max_length=cfg.max_length,
        drop_identical=drop_identical,
    )


def train_config(
    cfg: UnalignConfig, out: Path, loss: LossConfig, lr: float, **kw
) -> loop.TrainConfig:
    data = loop.DataConfig(pad_to_multiple=32)
    kw.setdefault("seed", cfg.seed)
    return protocol.train_config(cfg, out, lr, loss=loss, data=data, **kw)


def warm_up(cfg: UnalignConfig, lm, prompts, held_out, judge_fn, log) -> tuple[dict, dict]:
    """Stage 2 -> (params, info). Cached under `cache_dir/warmup-<key>/`."""
    w = cfg.warmup
    refusals = refusal_texts(w)
    key = fingerprint(
        cfg.model,
        dataclasses.asdict(w),
        refusals,
        [p.index for p in prompts],
        cfg.eval,
        cfg.judge,
        cfg.template,
    )
    root = Path(cfg.cache_dir) / f"warmup-{key}"

    def compute():
        rng = np.random.default_rng(cfg.seed)
        targets = [refusals[i] for i in rng.integers(len(refusals), size=len(prompts))]
        records = [
            preference.PreferenceRecord(p.index, [{"role": "user", "content": p.text}], t, t)
            for p, t in zip(prompts, targets)
        ]
        pairs, _ = tokenize(cfg, lm.tokenizer, records, drop_identical=False)
        epochs = -(-w.max_rounds * w.steps_per_round * w.batch_size // len(pairs))
        rounds, params, t0 = [], lm.params, time.time()
        seed0 = (cfg.eval.seeds[0],)
        rate = refusal_rates(
            cfg, lm, held_out, judge_fn, seed0, "warm-up round 0", log, w.temperature
        )["mean"]
        rounds.append({"round": 0, "steps": 0, "refusal_rate": rate})
        for r in range(1, w.max_rounds + 1):
            if rate >= w.target[0]:
                break
            tc = dataclasses.replace(
                train_config(
                    cfg,
                    root / "loop",
                    LossConfig("sft", sft_length_average=True),
                    w.lr,
                    final_eval=False,
                ),
                batch_size=w.batch_size,
                num_epochs=epochs,
                max_steps=r * w.steps_per_round,
            )  # each round resumes the previous one's checkpoint
            result = loop.train(tc, model=lm, pairs=pairs)
            params = result.params
            trained = dataclasses.replace(lm, params=params)
            rate = refusal_rates(
                cfg, trained, held_out, judge_fn, seed0, f"warm-up round {r}", log, w.temperature
            )["mean"]
            rounds.append(
                {
                    "round": r,
                    "steps": r * w.steps_per_round,
                    "refusal_rate": rate,
                    "sft_loss": result.metrics[-1]["loss"] if result.metrics else None,
                }
            )
        info = {
            "rounds": rounds,
            "refusal_rate": rate,
            "in_target": w.target[0] <= rate <= w.target[1],
            "sft_prompts": len(pairs),
            "held_out_prompts": len(held_out),
            "seconds": time.time() - t0,
        }
        return params, info

    def save(path, value):
        save_param_tree(
            root / "params.safetensors", value[0]
        )  # the weights first: the JSON marks done
        shutil.rmtree(root / "loop", ignore_errors=True)
        files.write_json(path, value[1], indent=2)

    def load(path):
        log(f"warm-up: cached in {root}")
        return load_param_tree(root / "params.safetensors"), json.loads(path.read_text())

    params, info = files.cached(root / "warmup.json", compute, load, save)
    return load_param_tree(root / "params.safetensors"), info


def progress_bar(cfg: UnalignConfig, desc: str) -> str | None:
    return desc if cfg.progress else None
