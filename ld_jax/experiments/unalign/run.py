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
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ld_jax import ches, files, generate, judge, models
from ld_jax.data import formatting, preference
from ld_jax.digest import fingerprint, pairs_digest
from ld_jax.errors import LdJaxError
from ld_jax.experiments import protocol
from ld_jax.experiments.unalign import onpolicy
from ld_jax.experiments.unalign import report as unalign_report
from ld_jax.experiments.unalign.config import UnalignConfig
from ld_jax.losses import LossConfig, preference_loss
from ld_jax.models.loading import load_param_tree, save_param_tree
from ld_jax.train import feed, loop, reference, sharding


def refusal_rates(
    cfg: UnalignConfig, lm, prompts, judge_fn, seeds, desc: str, log, temperature=None
) -> dict:
    """Sample one reply per prompt and seed (cfg.eval; `temperature` overrides its temperature)
    and judge it -> {"rates": [per seed], "mean", "unparsable": [per seed], "replies": seed-0
    [(text, verdict)] in prompt order}."""
    texts, rates, unparsable, replies = [p.text for p in prompts], [], [], []
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
                lm, texts, sampling, cfg.template, progress=_bar(cfg, f"{desc} seed {seed}")
            )
        ]
        verdicts = judge_fn(texts, out)
        summary = judge.summarize(verdicts)
        rates.append(
            float("nan") if summary["refusal_rate"] is None else summary["refusal_rate"]
        )  # all unparsable
        unparsable.append(summary["unparsable"])
        if not replies:
            replies = [(t, v.label) for t, v in zip(out, verdicts)]
        log(f"{desc} seed {seed}: refusal rate {rates[-1]:.3f} ({time.time() - t0:.0f} s)")
    return {
        "rates": rates,
        "mean": float(np.mean(rates)),
        "unparsable": unparsable,
        "replies": replies,
    }


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
    return loop.TrainConfig(
        model=cfg.model,
        output_dir=str(out),
        batch_size=cfg.batch_size,
        num_epochs=1,
        seed=cfg.seed,
        seq_chunk=cfg.seq_chunk,
        loss=loss,
        optimizer=dataclasses.replace(cfg.optimizer, lr=lr),
        data=loop.DataConfig(pad_to_multiple=32),
        keep_checkpoints=1,
        progress=cfg.progress,
        **kw,
    )


def warm_up(cfg: UnalignConfig, lm, prompts, held_out, judge_fn, log) -> tuple[dict, dict]:
    """Stage 2 -> (params, info). Cached under `cache_dir/warmup-<key>/`."""
    w = cfg.warmup
    key = fingerprint(
        cfg.model,
        dataclasses.asdict(w),
        [p.index for p in prompts],
        cfg.eval,
        cfg.judge,
        cfg.template,
    )
    root = Path(cfg.cache_dir) / f"warmup-{key}"

    def compute():
        rng = np.random.default_rng(cfg.seed)
        targets = [w.refusals[i] for i in rng.integers(len(w.refusals), size=len(prompts))]
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


def build_data(cfg: UnalignConfig, lm, prompts, judge_fn, warm_key: str, log) -> dict:
    """Stage 3 -> {"samples": [[a, b]], "labels": [[la, lb]], "seconds"} in prompt order, cached."""
    key = fingerprint(
        warm_key,
        [p.index for p in prompts],
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
            progress=_bar(cfg, "on-policy samples"),
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
) -> dict:
    """Train one epoch on `pairs` from `lm`, then the refusal rates. Kept in `store` as `name`.
    ref_logps: `[len(pairs), 2]` ln π(y±|x) of `lm`, when already computed."""

    def compute():
        t0, root = time.time(), store.workdir(name)
        result = loop.train(
            train_config(cfg, root, loss, lr), model=lm, pairs=pairs, ref_logps=ref_logps
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
    mesh = sharding.make_mesh(tc.mesh)
    layout = feed.batch_layout(tc.batch_size, len(pairs), mesh, tc.optimizer.grad_accum_steps)
    model = lm.with_options(dtype=tc.compute_dtype)
    padding = reference.Padding(
        models.pad_id(model), tc.data.pad_to_multiple, tc.data.padding_side, tc.data.layout
    )
    return reference.reference_logps(
        model,
        pairs,
        mesh,
        rows=layout.eval_rows,
        seq_chunk=tc.seq_chunk,
        padding=padding,
        cache_dir=Path(cfg.cache_dir) / "init_logps",
        progress=cfg.progress,
    )


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
        before_key = fingerprint(
            warm_key,
            [p.index for p in experiment],
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
        runs = {}

        def run(name, prs, loss, lr_, ref=init):
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
            )

        lr, trials = protocol.lr_search(
            cfg.lr_grid,
            lambda lr_: [run(f"full_lr{lr_:g}", tokenized, cfg.loss, lr_)],
            "falls_overall",
            curve=lambda r: [r["loss_before"], r["loss_after"]],
        )
        search = [
            {
                "lr": lr_,
                "stable": ok,
                "loss_before": recs[0]["loss_before"],
                "loss_after": recs[0]["loss_after"],
            }
            for lr_, recs, ok in trials
        ]
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
                runs["gold"] = run("gold", gold, cfg.loss, lr, None)
                runs["gold"]["filter"] = gold_report.summary()
            else:
                log("gold: the prompt file has no gold pairs (format jsonl); condition skipped")
        keep = (
            onpolicy.lowest_fraction(scores["ln_ches"], cfg.ches_fraction)
            if "ches" in cfg.conditions
            else None
        )
        if keep is not None:
            runs["ches"] = run(
                f"ches_{cfg.ches_fraction:g}",
                [tokenized[i] for i in keep],
                cfg.loss,
                lr,
                init[keep],
            )
            trained = runs["ches"].get("pair_indices")
            if trained is not None and sorted(trained) != sorted(tokenized[i].index for i in keep):
                log(
                    f"warning: the cached CHES run trained on pairs {trained}, the scores now select others"
                )

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


def _bar(cfg: UnalignConfig, desc: str) -> str | None:
    return desc if cfg.progress else None
