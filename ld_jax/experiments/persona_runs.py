"""Executing Persona runs: the optional SFT phase and the tracked DPO/IPO runs, one after another.

Both are slow on a CPU (a SmolLM2 step is about a second), so both persist as they go: the SFT
params are cached under `$LD_JAX_CACHE/persona_sft/`, and every finished run is saved to
`<out_dir>/runs/<fingerprint>/` as an .npz that a restarted command picks up instead of
re-running it. The fingerprint covers everything a run depends on except its own lr, pair and
seed, which are in the file name.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ld_jax import files
from ld_jax import models
from ld_jax.experiments import persona_step
from ld_jax.host_memory import release_freed_memory
from ld_jax.models.loading import load_param_tree, save_param_tree
from ld_jax.train.optim import OptimizerConfig, make_optimizer


def pad(seqs: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids `[n, length]`, mask `[n, length]` and last-token index `[n]`."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask, np.array([len(s) - 1 for s in seqs], np.int32)


def round_up(n: int, k: int = 8) -> int:
    return -(-n // k) * k


def cache_dir() -> Path:
    return Path(os.environ.get("LD_JAX_CACHE") or "~/.cache/ld_jax").expanduser()


def sft_phase(lm, params, prompts: list[list[int]], labels: np.ndarray, cfg, key: str) -> tuple[dict, dict]:
    """`cfg.epochs` of SFT (paper J.1): CE on each prompt's label token, RMSProp, batches of
    `cfg.batch_size` in a seeded random order. Cached on disk under `key`. Returns (params, info)."""
    path = cache_dir() / "persona_sft" / f"{key}.safetensors"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        print(f"SFT phase: cached at {path}")
        return load_param_tree(path), json.loads(info_path.read_text())
    opt = make_optimizer(OptimizerConfig(name="rmsprop", lr=cfg.lr))
    sft_step = persona_step.make_sft_step(lm, opt)
    pad_id = models.pad_id(lm)
    ids, mask, last = pad(prompts, round_up(max(map(len, prompts))), pad_id)
    label_logp = jax.jit(functools.partial(persona_step.label_logprobs, lm))
    b = cfg.batch_size

    def mean_label_prob(params) -> float:
        chunks = [np.exp(label_logp(params, ids[i : i + b], mask[i : i + b], last[i : i + b], labels[i : i + b]))
                  for i in range(0, len(prompts), b)]
        return float(np.mean(np.concatenate(chunks)))

    before, t0 = mean_label_prob(params), time.time()
    rng = np.random.default_rng(cfg.seed)
    opt_state, losses = opt.init(params), []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(prompts))
        # The last partial batch is filled with repeats at weight 0, so the step compiles once.
        for start in tqdm(range(0, len(prompts), b), desc=f"SFT epoch {epoch + 1}/{cfg.epochs}", unit="batch"):
            idx = order[start : start + b]
            weight = (np.arange(b) < len(idx)).astype(np.float32)
            idx = np.concatenate([idx, np.full(b - len(idx), idx[0])])
            params, opt_state, loss = sft_step(params, opt_state, ids[idx], mask[idx], last[idx], labels[idx], weight)
            losses.append(float(loss))
            # Batches of 32 prompts fragment the untrimmed heap (an SFT phase once grew to 16 GB).
            release_freed_memory()
    info = {"steps": len(losses), "lr": cfg.lr, "loss_first_batch": losses[0], "loss_last_batch": losses[-1],
            "mean_label_prob_before": before, "mean_label_prob_after": mean_label_prob(params),
            "seconds": time.time() - t0}
    save_param_tree(path, params)
    files.write_text(info_path, json.dumps(info))
    return params, info


def loss_rose(loss: np.ndarray) -> bool:
    """Whether a training loss `[steps + 1]` failed to fall strictly at some step (the run is then
    excluded, and in the lr search the lr is rejected)."""
    return not bool(np.all(np.diff(loss) < 0))


class Runner:
    """Runs from shared initial params, each with its own progress bar, saved as they finish.

    pair_ids: (y+, y−) token ids per pair; predicted: per pair, the token ids Theorem 5 ranks
    highest; watch_base: token ids watched in every run. A run's `watch_ids` are
    [y+, y−, *predicted, *watch_base].
    """

    def __init__(self, lm, params, cfg, prompts, pair_ids, predicted, watch_base, store: Path):
        self.lm, self.params, self.cfg, self.prompts = lm, params, cfg, prompts
        self.pair_ids, self.predicted, self.watch_base = pair_ids, predicted, watch_base
        self.store = store
        self.first_rise: dict | None = None  # where the last stop_on_rise run stopped
        self.opt, self.step, self.measure, self.initial = persona_step.make_run_fns(lm, cfg.loss, cfg.optimizer, cfg.track_k)

    def _batch(self, run) -> dict:
        prompt = self.prompts[run.prompt]
        # Lengths rounded up to a multiple of 8: little padding, and few shapes to compile.
        ids, mask, last = (a[0] for a in pad([prompt], round_up(len(prompt)), models.pad_id(self.lm)))
        logp0, _ = self.initial(self.params, ids, mask, last)  # [V]: the reference, computed once
        y_pos, y_neg = self.pair_ids[run.pair]
        watch = np.array([y_pos, y_neg, *self.predicted[run.pair], *self.watch_base], np.int32)
        return {"ids": ids, "mask": mask, "last": last, "y_pos": y_pos, "y_neg": y_neg,
                "ref_pos": logp0[y_pos], "ref_neg": logp0[y_neg], "p0": jnp.exp(logp0),
                "watch": watch, "lr": np.float32(run.lr)}

    def _path(self, run) -> Path:
        y_pos, y_neg = self.cfg.pairs[run.pair]
        return self.store / f"lr{run.lr:g}_{y_pos}_{y_neg}_seed{run.seed}_prompt{run.prompt}.npz"

    def one(self, run, desc: str, stop_on_rise: bool = False) -> dict | None:
        """The tracked history of one run: `[steps + 1, ...]` arrays (see persona_tables); None
        when `stop_on_rise` and its loss stopped falling (the lr search then stops at once)."""
        path = self._path(run)
        if path.is_file():
            with np.load(path) as saved:
                return {**{k: saved[k] for k in saved.files}, "run": run}
        batch = self._batch(run)
        params = jax.tree.map(jnp.copy, self.params)  # the step donates its input
        opt_state, hist = self.opt.init(params), []
        y_pos, y_neg = self.cfg.pairs[run.pair]
        bar = tqdm(range(self.cfg.steps), desc=f"{desc} ({y_pos}, {y_neg}) seed {run.seed}", unit="step")
        for _ in bar:
            params, opt_state, m = self.step(params, opt_state, batch)
            hist.append(jax.device_get(m))
            bar.set_postfix(loss=f"{hist[-1]['loss']:.4g}", p_pos=f"{np.exp(hist[-1]['logp_pos']):.3f}", refresh=False)
            if stop_on_rise and len(hist) > 1 and loss_rose(np.array([hist[-2]["loss"], hist[-1]["loss"]])):
                bar.close()
                self.first_rise = {"pair": [y_pos, y_neg], "seed": run.seed, "step": len(hist) - 1,
                                   "loss": [float(hist[-2]["loss"]), float(hist[-1]["loss"])]}
                return None
        hist.append(jax.device_get(self.measure(params, batch)))
        rec = {**{k: np.stack([h[k] for h in hist]) for k in hist[0]}, "watch_ids": batch["watch"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        files.save_npz(path, **rec)
        release_freed_memory()  # the run's params and optimizer state (3 model copies) are garbage now
        return {**rec, "run": run}

    def many(self, runs: list, desc: str, stop_on_rise: bool = False) -> list[dict] | None:
        out = []
        for i, run in enumerate(runs):
            rec = self.one(run, f"{desc} run {i + 1}/{len(runs)}", stop_on_rise)
            if rec is None:
                return None
            out.append(rec)
        return out
