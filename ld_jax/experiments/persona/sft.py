"""E1's SFT phase (paper Appendix J.1): cross-entropy on a random label from each prompt's set,
through the library's training loop (`train.loop.train` with the `sft` loss), cached.

Two rules pick its lr and length:
- `fixed`: `epochs` epochs over all prompts at `lr` (the paper's recipe: one epoch, lr 1e-7;
  the earlier protocol of this project, kept so its results can be rebuilt).
- `set_mass` (the default): hold out `heldout` prompts; for each lr of `lr_grid` in ascending
  order, train on the other prompts for up to `epochs` epochs, measuring the held-out prompts'
  mean set mass (Σ_{t ∈ set} π(t|x), the set of the prompt's label) every `eval_every` steps
  and at the end; the first (lr, step) whose mass reaches `target_mass` is the SFT phase. The
  0.9 is this project's way to reach the paper's intent ("to mimic a scenario where one aims to
  align a model with safe behaviors": a model that answers from the label sets), not a number
  of the paper. The rule reads SFT metrics only, never a DPO outcome.

An lr's trial grows by resuming the loop's checkpoint with a larger `max_steps` (a resumable
change), so the evaluation points cost no retraining.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ld_jax import files, models
from ld_jax.data.formatting import TokenizedPair
from ld_jax.digest import fingerprint, params_digest
from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig
from ld_jax.models.loading import load_param_tree, save_param_tree
from ld_jax.train import loop, reference
from ld_jax.train.optim import OptimizerConfig


def split(n: int, heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) prompt indices: a seeded random `heldout` of `n`, both sorted."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[heldout:]), np.sort(order[:heldout])


_NEXT_TOKEN: dict = {}


def _next_token_fn(lm):
    """Jitted: params, ids `[B, s]` right-padded, mask `[B, s]`, last `[B]` -> log-probs `[B, V]`
    of the token after each row's last real position (one per architecture)."""
    if lm.config not in _NEXT_TOKEN:

        def fn(params, ids, mask, last):
            hidden = lm.hidden_states(params, ids, mask)  # [B, s, d]
            h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, d]
            logits = lm.logits_from_hidden(params, h)[:, 0]
            return jax.nn.log_softmax(logits.astype(jnp.float32))

        _NEXT_TOKEN[lm.config] = jax.jit(fn)
    return _NEXT_TOKEN[lm.config]


def next_token_probs(lm, params, prompts: list[list[int]], token_ids, rows: int = 16) -> np.ndarray:
    """π(t | prompt) `[len(prompts), len(token_ids)]` for the next token after each prompt, in
    batches of `rows` right-padded to a multiple of 8 (causal attention: a real position never
    sees the padding after it)."""
    fn, ids = _next_token_fn(lm), np.asarray(token_ids, np.int32)
    pad, out = models.pad_id(lm), np.zeros((len(prompts), len(ids)))
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together
    for start in range(0, len(order), rows):
        chunk = order[start : start + rows]
        width = -(-max(len(prompts[i]) for i in chunk) // 8) * 8
        x = np.full((rows, width), pad, np.int32)  # a fixed row count: one shape per width
        mask = np.zeros((rows, width), np.int32)
        last = np.zeros(rows, np.int32)
        for r, i in enumerate(chunk):
            x[r, : len(prompts[i])], mask[r, : len(prompts[i])] = prompts[i], 1
            last[r] = len(prompts[i]) - 1
        mask[len(chunk) :, 0] = 1  # filler rows: one real token, so no row is fully masked
        logp = np.asarray(fn(params, x, mask, last), np.float64)
        out[chunk] = np.exp(logp[: len(chunk)][:, ids])
    return out


def describe(probs: np.ndarray, words: list[str]) -> dict:
    """Per word: mean, min and max of its probability over the rows of `probs` `[n, len(words)]`,
    and the set mass (row sums): the numbers the results page reports after SFT."""
    mass = probs.sum(1)
    return {
        "prompts": int(len(probs)),
        "set_mass": {
            "mean": float(mass.mean()),
            "min": float(mass.min()),
            "max": float(mass.max()),
        },
        "tokens": {
            w: {"mean": float(c.mean()), "min": float(c.min()), "max": float(c.max())}
            for w, c in zip(words, probs.T)
        },
    }


def evaluate(lm, params, prompts, records, idx, tokens, no_set, yes_set, pairs) -> dict:
    """Held-out statistics: per set (no / yes prompts, by whether they accord with the trait),
    each set token's probability and the set mass; per pair, π(y+) and π(y−) on the prompts that
    pair trains on; `set_mass` the mean over all held-out prompts of their own set's mass."""
    out, masses = {"sets": {}, "pairs": []}, []
    for name, words, accords in (("no", no_set, True), ("yes", yes_set, False)):
        rows = [i for i in idx if records[i]["accords"] == accords]
        probs = next_token_probs(
            lm, params, [prompts[i] for i in rows], [tokens[w]["id"] for w in words]
        )
        out["sets"][name] = describe(probs, list(words)) if rows else None
        masses += list(probs.sum(1))
    for y_pos, y_neg in pairs:
        rows = [i for i in idx if records[i]["accords"] == (y_pos in no_set)]
        probs = next_token_probs(
            lm, params, [prompts[i] for i in rows], [tokens[y_pos]["id"], tokens[y_neg]["id"]]
        )
        out["pairs"].append({"pair": [y_pos, y_neg], **describe(probs, [y_pos, y_neg])["tokens"]})
    out["set_mass"] = float(np.mean(masses))
    return out


def phase(cfg, lm, prompts, records, tokens, cache_root: Path, log) -> tuple[dict, dict, str]:
    """The SFT phase of `cfg.sft` on `prompts` (token ids per Persona record) -> (params, info,
    cache key). Labels: a seeded random word of the prompt's set (no_set for prompts that accord
    with the trait, yes_set for the others). Cached as `<cache_root>/persona_sft/<key>.safetensors`
    beside its `.json` record; an lr's trial keeps its loop checkpoints in `<key>/lr<lr>/`."""
    s = cfg.sft
    rng = np.random.default_rng(s.seed)
    labels = [
        tokens[rng.choice(cfg.no_set if r["accords"] else cfg.yes_set)]["id"] for r in records
    ]
    if s.rule == "fixed":
        train_idx, held = np.arange(len(records)), np.arange(0)
    elif s.heldout >= len(records):
        raise LdJaxError(f"sft.heldout={s.heldout} leaves no training prompt of {len(records)}")
    else:
        train_idx, held = split(len(records), s.heldout, s.seed)
    pairs = [TokenizedPair(int(i), list(prompts[i]), [labels[i]], [labels[i]]) for i in train_idx]

    def trial_config(lr: float, out: Path, max_steps=None) -> loop.TrainConfig:
        return loop.TrainConfig(
            model=cfg.model,
            output_dir=str(out),
            batch_size=s.batch_size,
            num_epochs=s.epochs,
            max_steps=max_steps,
            seed=s.seed,
            final_eval=False,
            progress=False,
            loss=LossConfig("sft"),
            optimizer=OptimizerConfig(name="rmsprop", lr=lr),
            data=loop.DataConfig(pad_to_multiple=8),
            keep_checkpoints=1,
        )

    grid = (s.lr,) if s.rule == "fixed" else tuple(s.lr_grid)
    identities = [loop.run_identity(trial_config(lr, Path(".")), lm, pairs) for lr in grid]
    weights = params_digest(lm.params, sample=64)
    if s.rule == "fixed":  # the earlier protocol's key, so that its cached phase is found again
        key = fingerprint(identities[0], weights)
    else:
        key = fingerprint(
            dataclasses.asdict(s) | {"enabled": True}, identities, held.tolist(), weights
        )
    path = Path(cache_root) / "persona_sft" / f"{key}.json"
    stats = functools.partial(
        evaluate,
        lm,
        prompts=prompts,
        records=records,
        idx=held,
        tokens=tokens,
        no_set=cfg.no_set,
        yes_set=cfg.yes_set,
        pairs=cfg.pairs,
    )

    def mean_label_prob(params) -> float:
        logps = reference.reference_logps(
            dataclasses.replace(lm, params=params), pairs, rows=s.batch_size
        )
        return float(np.exp(logps[:, 0]).mean())

    def compute():
        t0 = time.time()
        steps_per_epoch = -(-len(pairs) // s.batch_size)
        total = steps_per_epoch * s.epochs
        info = {"rule": s.rule, "train_prompts": len(pairs), "heldout_prompts": len(held)}
        if s.rule == "fixed":
            result = loop.train(
                trial_config(s.lr, path.with_suffix("") / "fixed"), model=lm, pairs=pairs
            )
            params = jax.device_get(result.params)
            info |= {
                "lr": s.lr,
                "steps": len(result.metrics),
                "loss_first_batch": result.metrics[0]["loss"],
                "loss_last_batch": result.metrics[-1]["loss"],
                "mean_label_prob_before": mean_label_prob(lm.params),
                "mean_label_prob_after": mean_label_prob(params),
            }
        else:
            info["before"] = stats(params=lm.params)
            log(f"SFT: held-out set mass before {info['before']['set_mass']:.3f}")
            info["trials"], params, chosen = [], None, None
            for lr in grid:
                out = path.with_suffix("") / f"lr{lr:g}"
                # evaluations so far, kept beside the trial's checkpoints: a restarted phase
                # resumes the trial past them (the loop cannot go back to an earlier step)
                done = out / "evals.json"
                evals = json.loads(done.read_text()) if done.is_file() else []
                points = sorted({*range(s.eval_every, total, s.eval_every), total})
                for k in points:
                    stored = next((e for e in evals if e["step"] == k), None)
                    if stored is None:
                        result = loop.train(trial_config(lr, out, k), model=lm, pairs=pairs)
                        stored = {
                            "step": k,
                            "heldout_set_mass": stats(params=result.params)["set_mass"],
                            "loss": result.metrics[-1]["loss"],
                        }
                        evals.append(stored)
                        files.write_json(done, evals)
                        log(
                            f"SFT lr {lr:g} step {k}/{total}: held-out set mass "
                            f"{stored['heldout_set_mass']:.3f}, batch loss {stored['loss']:.3f}"
                        )
                    if stored["heldout_set_mass"] >= s.target_mass:
                        chosen = {"lr": lr, "steps": k}
                        break
                info["trials"].append({"lr": lr, "evals": evals, "reached": chosen is not None})
                if chosen is not None:
                    break
            if chosen is None:  # no lr reached the target: the last trial's end, reported as such
                log(
                    f"SFT: no lr of {grid} reached held-out set mass {s.target_mass}; "
                    f"using lr {grid[-1]:g} after {total} steps"
                )
                chosen = {"lr": grid[-1], "steps": total}
            # the chosen trial's checkpoint is at the chosen step: the loop restores it
            out = path.with_suffix("") / f"lr{chosen['lr']:g}"
            result = loop.train(
                trial_config(chosen["lr"], out, chosen["steps"]), model=lm, pairs=pairs
            )
            params = jax.device_get(result.params)
            info |= chosen | {
                "epochs": chosen["steps"] / steps_per_epoch,
                "reached": info["trials"][-1]["reached"],
                "after": stats(params=params),
            }
        info["seconds"] = time.time() - t0
        return params, info

    def save(p, value):
        save_param_tree(
            p.with_suffix(".safetensors"), value[0]
        )  # the weights first: the JSON marks done
        files.write_json(p, value[1])

    def load(p):
        log(f"SFT phase: cached at {p.with_suffix('.safetensors')}")
        return load_param_tree(p.with_suffix(".safetensors")), json.loads(p.read_text())

    params, info = files.cached(path, compute, load, save)
    return params, info, key
