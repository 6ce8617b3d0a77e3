"""Experiment E3 (SPEC §6, paper Section 6, Figure 3, Appendix J.3): unintentional unalignment
from on-policy refusal data, and CHES filtering against the SFT term.

    run_unalign(UnalignConfig(...))             # `ld-jax unalign --config FILE.yaml`

Stages, each cached on disk so that a re-run (or the IPO config after the DPO one) skips it:
1. Prompts: the first user turn of each unsafe dialogue; empty, over-long and duplicate prompts
   are counted and left out. Seeded disjoint draws give the experiment's prompts and the
   warm-up's.
2. Alignment warm-up (optional): small instruct models refuse too rarely for E3, so SFT on
   refusal replies to the warm-up prompts, in rounds, until the refusal rate on held-out
   warm-up prompts reaches `warmup.target[0]`. The result is "the starting model".
3. On-policy data: two samples per prompt from the starting model (temperature 1), judged; a
   refusal is preferred, ties broken at random (or by a reward model). Split 85/15 by prompt.
4. The refusal rate of the starting model on the train and test prompts (temperature 0.7, a
   draw per seed).
5. One epoch of DPO/IPO per condition, from the starting model through the one training loop:
   `full`; `sft` (full + λ·SFT, λ from `sft_lambdas`, best by train refusal rate); `gold`
   (HH-RLHF's chosen/rejected of the same prompts); `ches` (the `ches_fraction` of train pairs
   with the lowest length-normalised CHES). Then the refusal rates again.
6. results.json, tables, Figure 3/4-style plots and Table 18-style examples (`unalign.report`).

Library calls: `generate` and `judge` for samples and verdicts, `train.loop.train` (the `sft`
loss for the warm-up, DPO/IPO for the conditions), `train.reference.reference_logps` and
`ches.score_pairs` (cached by key), `protocol.RunStore` for the conditions, `protocol.lr_search`
with the rule "falls_overall", `protocol.cached_json` for the stages, `protocol.Log`/`Stages`.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from ld_jax import ches, generate, judge, models
from ld_jax.digest import fingerprint, pairs_digest
from ld_jax.errors import LdJaxError
from ld_jax.experiments import protocol
from ld_jax.experiments.unalign import onpolicy
from ld_jax.experiments.unalign import report as unalign_report
from ld_jax.experiments.unalign.config import UnalignConfig
from ld_jax.experiments.unalign.warmup import (
    across_seeds,
    progress_bar,
    refusal_rates,
    tokenize,
    train_config,
    warm_up,
)
from ld_jax.losses import LossConfig, preference_loss
from ld_jax.train import loop, reference


def _key(warm_key: str, prompts, *parts) -> str:
    """Cache key of a stage that depends on the warmed-up model and a set of prompts."""
    return fingerprint(warm_key, [p.index for p in prompts], *parts)


def build_data(cfg: UnalignConfig, lm, prompts, judge_fn, warm_key: str, log) -> dict:
    """Stage 3 -> {"samples": [[a, b]], "labels": [[la, lb]], "seconds"} in prompt order, cached."""
    key = _key(
        warm_key,
        prompts,
        cfg.temperature,
        cfg.max_new_tokens,
        cfg.seed,
        cfg.judge,
        cfg.template,
    )

    def compute():
        t0 = time.time()
        sampling = generate.SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed,
            batch_size=cfg.sample_batch_size,
        )
        texts = [p.text for p in prompts]
        out = generate.generate_text(
            lm,
            texts,
            sampling,
            cfg.template,
            num_samples=2,
            progress=progress_bar(cfg, "on-policy samples"),
        )
        responses = [[out[2 * i].text, out[2 * i + 1].text] for i in range(len(prompts))]
        verdicts = judge_fn(
            [t for t in texts for _ in range(2)], [r for pair in responses for r in pair]
        )
        labels = [[verdicts[2 * i].label, verdicts[2 * i + 1].label] for i in range(len(prompts))]
        return {
            "samples": responses,
            "labels": labels,
            "judge": judge.summarize(verdicts),
            "seconds": time.time() - t0,
        }

    return protocol.cached_json(Path(cfg.cache_dir) / f"samples-{key}.json", compute)


def reward_tie_scores(path: str, prompts, responses) -> list[tuple[float, float]]:
    """Scores of a local Hugging Face reward model (sequence classifier, logit 0) for each pair."""
    judge.require_torch("a Hugging Face reward model")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    rm = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    scores = []
    with torch.no_grad():
        for p, pair in zip(prompts, responses):
            enc = tok([p.text] * 2, list(pair), return_tensors="pt", padding=True, truncation=True)
            scores.append(tuple(float(x) for x in rm(**enc).logits[:, 0]))
    return scores


def run_condition(
    cfg,
    lm,
    name,
    pairs,
    loss,
    lr,
    store,
    train_prompts,
    test_prompts,
    judge_fn,
    log,
    ref_logps=None,
    epochs=1,
    seed=None,
) -> dict:
    """Train `epochs` epochs on `pairs` from `lm` with the loop seed `seed` (default
    `cfg.seed`), then the refusal rates. Kept in `store` as `name`. ref_logps:
    `[len(pairs), 2]` ln π(y±|x) of `lm`, when already computed."""
    seed = cfg.seed if seed is None else seed

    def compute():
        t0, root = time.time(), store.workdir(name)
        result = loop.train(
            train_config(cfg, root, loss, lr, num_epochs=epochs, seed=seed),
            model=lm,
            pairs=pairs,
            ref_logps=ref_logps,
        )
        init_loss = _loss(loss, result.init_logps, result.init_logps)
        final_loss = _loss(loss, result.final_logps, result.init_logps)
        trained = dataclasses.replace(lm, params=result.params)
        rec = {
            "name": name,
            "pairs": len(pairs),
            "pair_indices": [p.index for p in pairs],
            "lr": lr,
            "loss": dataclasses.asdict(loss),
            "epochs": epochs,
            "seed": seed,
            "steps": len(result.metrics),
            "logp_chosen_change": result.summary["mean_chosen_logp_change"],
            "logp_rejected_change": result.summary["mean_rejected_logp_change"],
            "loss_before": init_loss,
            "loss_after": final_loss,
            "stable": bool(np.isfinite(final_loss) and final_loss < init_loss),
            "train": refusal_rates(
                cfg, trained, train_prompts, judge_fn, cfg.eval.seeds, f"{name} train", log
            ),
            "test": refusal_rates(
                cfg, trained, test_prompts, judge_fn, cfg.eval.seeds, f"{name} test", log
            ),
            "seconds": time.time() - t0,
        }
        shutil.rmtree(root / "checkpoints", ignore_errors=True)
        return rec

    if store.get(name) is not None:
        log(f"{name}: cached in {store.path(name)}")
    return store.run(name, compute)


def initial_logps(cfg: UnalignConfig, lm, pairs) -> np.ndarray:
    """ln π(y±|x) `[len(pairs), 2]` of the starting model, batched as the loop batches its
    reference pass; cached under `cache_dir/init_logps`."""
    tc = train_config(cfg, Path(cfg.cache_dir), cfg.loss, cfg.optimizer.lr)
    return reference.like_training(tc, lm, pairs, Path(cfg.cache_dir) / "init_logps", cfg.progress)


def _loss(cfg: LossConfig, logps: np.ndarray, ref: np.ndarray) -> float:
    """The preference term alone over the pairs (the loop's summary loss includes the SFT term,
    which would make the SFT runs' stability incomparable with the others)."""
    losses, _ = preference_loss(
        dataclasses.replace(cfg, sft_lambda=0.0), logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1]
    )
    return float(np.mean(np.asarray(losses)))


# ---- the experiment ----------------------------------------------------------------------------


def run_unalign(cfg: UnalignConfig) -> dict:
    """E3 end to end; writes results.json, table.md, figure3.png, figure4.png, examples.md."""
    t_start, log = time.time(), protocol.Log("unalign", cfg.progress)
    stages = protocol.Stages(log)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = models.from_pretrained(cfg.model)
    tok, judge_fn = lm.tokenizer, judge.build_judge(cfg.judge)
    if tok is None:
        raise LdJaxError(f"{cfg.model}: the checkpoint has no tokenizer files")

    def count_tokens(text: str) -> int:
        return len(
            tok(generate.format_prompts(tok, [text], cfg.template)[0], add_special_tokens=False)[
                "input_ids"
            ]
        )

    with stages("prompts"):
        all_prompts, prompt_counts = onpolicy.read_prompts(cfg.prompts, count_tokens)
        need_gold = "gold" in cfg.conditions and cfg.prompts.format == "hh"
        n_warm = cfg.warmup.n_prompts + cfg.warmup.eval_prompts if cfg.warmup.enabled else 0
        experiment, warm = onpolicy.choose_prompts(
            all_prompts, cfg.n_prompts, n_warm, cfg.seed, need_gold
        )
        train_prompts, test_prompts = onpolicy.split_prompts(
            experiment, cfg.test_fraction, cfg.seed
        )
    log(
        f"prompts: {len(all_prompts)} usable, left out {prompt_counts}; {len(train_prompts)} train, "
        f"{len(test_prompts)} test, {len(warm)} warm-up"
    )

    with stages("warm-up"):
        warm_info, warm_key = None, fingerprint(cfg.model, "no warm-up")
        if cfg.warmup.enabled:
            held = warm[: cfg.warmup.eval_prompts]
            params, warm_info = warm_up(
                cfg, lm, warm[cfg.warmup.eval_prompts :], held, judge_fn, log
            )
            lm = dataclasses.replace(lm, params=params)
            warm_key = fingerprint(cfg.model, warm_info)

    with stages("on-policy data"):
        samples = build_data(cfg, lm, experiment, judge_fn, warm_key, log)
        ties = (
            reward_tie_scores(cfg.reward_model, experiment, samples["samples"])
            if cfg.reward_model
            else None
        )
        pairs, pair_counts = onpolicy.build_pairs(
            experiment, samples["samples"], samples["labels"], cfg.seed, ties
        )
        train_ids = {p.index for p in train_prompts}
        train_pairs = [p for p in pairs if p.prompt.index in train_ids]
        tokenized, filter_report = tokenize(cfg, tok, onpolicy.as_records(train_pairs))
        by_index = {p.prompt.index: p for p in train_pairs}
        train_pairs = [by_index[p.index] for p in tokenized]  # the pairs that survive tokenisation

    with stages("refusal rates before"):
        before_key = _key(
            warm_key,
            experiment,
            cfg.eval,
            cfg.judge,
            cfg.template,
            cfg.test_fraction,
        )
        before = protocol.cached_json(
            Path(cfg.cache_dir) / f"before-{before_key}.json",
            lambda: {
                "train": refusal_rates(
                    cfg, lm, train_prompts, judge_fn, cfg.eval.seeds, "before train", log
                ),
                "test": refusal_rates(
                    cfg, lm, test_prompts, judge_fn, cfg.eval.seeds, "before test", log
                ),
            },
        )

    with stages("CHES scores"):  # of the warmed model on the exact token ids
        scores_key = fingerprint(warm_key, pairs_digest(tokenized))
        scores = protocol.cached_arrays(
            Path(cfg.cache_dir) / f"ches-{scores_key}.npz",
            lambda: ches.score_pairs(lm, tokenized, progress=cfg.progress),
        )

    with stages("training and evaluation"):
        init = initial_logps(cfg, lm, tokenized)  # for every condition on these pairs
        store = protocol.RunStore(out / "runs")
        runs, recipes = {}, {}  # recipes: run name -> its arguments, to repeat it with other seeds

        def run(name, prs, loss, lr_, ref=init, epochs=1, seed=None):
            recipes[name] = (prs, loss, lr_, ref, epochs)
            return run_condition(
                cfg,
                lm,
                name,
                prs,
                loss,
                lr_,
                store,
                train_prompts,
                test_prompts,
                judge_fn,
                log,
                ref,
                epochs,
                seed,
            )

        def search_lr(name, prs, ref=init):
            """The paper's rule: the largest lr of the grid whose run lowers its loss."""
            found, trials = protocol.lr_search(
                cfg.lr_grid,
                lambda lr_: [run(f"{name}_lr{lr_:g}", prs, cfg.loss, lr_, ref)],
                "falls_overall",
                curve=lambda r: [r["loss_before"], r["loss_after"]],
            )
            log_ = [
                {
                    "lr": lr_,
                    "stable": ok,
                    "loss_before": recs[0]["loss_before"],
                    "loss_after": recs[0]["loss_after"],
                }
                for lr_, recs, ok in trials
            ]
            return found, trials, log_

        lr, trials, search = search_lr("full", tokenized)
        if cfg.lr_grid and lr is None:
            raise LdJaxError(f"no stable lr in {cfg.lr_grid}: {search}")
        if lr is None:
            lr = cfg.optimizer.lr
        else:
            runs["full"] = trials[-1][1][0]
        if "full" in cfg.conditions and "full" not in runs:
            runs["full"] = run("full", tokenized, cfg.loss, lr)
        if "sft" in cfg.conditions:
            for lam in cfg.sft_lambdas:
                runs[f"sft_{lam:g}"] = run(
                    f"sft_{lam:g}", tokenized, dataclasses.replace(cfg.loss, sft_lambda=lam), lr
                )
        if "gold" in cfg.conditions:
            if need_gold:
                gold, gold_report = tokenize(cfg, tok, onpolicy.gold_records(train_prompts))
                # gold gets its own search by the same rule (the paper's chose 1e-6 for it)
                gold_lr, gold_trials, gold_search = (
                    search_lr("gold", gold, None) if cfg.lr_grid else (None, [], [])
                )
                if gold_lr is not None:
                    runs["gold"] = dict(gold_trials[-1][1][0])
                else:  # no grid, or no stable lr in it: the full data's lr, and it says so
                    runs["gold"] = run("gold", gold, cfg.loss, lr, None)
                runs["gold"]["lr_search"] = gold_search
                runs["gold"]["filter"] = gold_report.summary()
            else:
                log("gold: the prompt file has no gold pairs (format jsonl); condition skipped")
        keep = (
            onpolicy.lowest_fraction(scores["ln_ches"], cfg.ches_fraction)
            if "ches" in cfg.conditions
            else None
        )
        if keep is not None:
            subset = [tokenized[i] for i in keep]
            runs["ches"] = run(f"ches_{cfg.ches_fraction:g}", subset, cfg.loss, lr, init[keep])
            if "ches_equal_updates" in cfg.conditions and "full" in runs:
                # the same subset, repeated until it gets as many optimizer updates as the full
                # data's one epoch (issue 21: conditions with equal training)
                epochs = -(-runs["full"]["steps"] // max(runs["ches"]["steps"], 1))
                runs["ches_equal_updates"] = run(
                    f"ches_{cfg.ches_fraction:g}_x{epochs}",
                    subset,
                    cfg.loss,
                    lr,
                    init[keep],
                    epochs,
                )
            trained = runs["ches"].get("pair_indices")
            if trained is not None and sorted(trained) != sorted(p.index for p in subset):
                log(
                    f"warning: the cached CHES run trained on pairs {trained}, the scores now select others"
                )
        # every reported condition again with the other training seeds, same data, loss and lr
        seed_runs = {}
        for cond in unalign_report.reported(runs, cfg.sft_lambdas):
            first = runs[cond]
            seed_runs[cond] = [first] + [
                run(f"{first['name']}_seed{cfg.seed + k}", *recipes[first["name"]], cfg.seed + k)
                for k in range(1, cfg.train_seeds)
            ]

    result = {
        "config": dataclasses.asdict(cfg),
        "title": cfg.title or cfg.model,
        "lr": lr,
        "lr_search": search,
        "prompt_counts": {
            "usable": len(all_prompts),
            **prompt_counts,
            "experiment": len(experiment),
            "train": len(train_prompts),
            "test": len(test_prompts),
            "warm_up": len(warm),
        },
        "warmup": warm_info,
        "sampling_judge": samples["judge"],
        "pair_counts": pair_counts,
        "filter": filter_report.summary(),
        "pair_types": onpolicy.type_counts(train_pairs),
        "pair_types_all": onpolicy.type_counts(pairs),
        "before": before,
        "runs": runs,
        "training_seeds": {c: across_seeds(recs) for c, recs in seed_runs.items()},
        "ches": {
            "ln_ches": scores["ln_ches"].tolist(),
            "pair_type": [p.pair_type for p in train_pairs],
            "kept": [] if keep is None else keep.tolist(),
        },
        "train_pairs": [
            {
                "index": p.prompt.index,
                "prompt": p.prompt.text,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "type": p.pair_type,
                "tie": p.tie,
            }
            for p in train_pairs
        ],
        "train_prompts": [p.text for p in train_prompts],
        "test_prompts": [p.text for p in test_prompts],
        "stages_s": stages.seconds,
        "seconds": time.time() - t_start,
        "machine": protocol.machine(),
    }
    result.update(unalign_report.write_all(out, result, cfg.sft_lambdas, cfg.examples_shown))
    return result
