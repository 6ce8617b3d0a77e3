"""The one preference-training loop. Experiments configure it (`TrainConfig`) and call `train`.

    result = train(cfg)                                  # data and model from the config
    result = train(cfg, model=lm, pairs=pairs, callback=fn)  # in-memory, from Python

What it does: tokenized pairs -> reference log-probs (computed once with the initial model and
cached next to the run, keyed by a hash of data, model and compute dtype; or recomputed for
every batch with `reference="on_the_fly"`) -> grain batches (deterministic by seed) -> the jitted
sharded step, with a progress bar, `metrics.jsonl`, orbax checkpoints every `checkpoint_every`
steps and automatic resume from the latest one, a stop on a non-finite loss that leaves the last
good checkpoint alone, and a final evaluation over the whole dataset written to `summary.json`:
did likelihood displacement occur (SPEC §3 Definition 1: the loss went down and so did the mean
ln π(y+|x))?
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ld_jax import distributed
from ld_jax.config import to_dict
from ld_jax.data import formatting, pipeline, preference
from ld_jax.digest import fingerprint, pairs_digest, params_digest
from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig
from ld_jax.models.core import result_fields
from ld_jax.train import feed, sharding
from ld_jax.train.checkpoint import Checkpoints
from ld_jax.train.optim import OptimizerConfig, make_optimizer
from ld_jax.train.state import init_state
from ld_jax.train.step import SEQUENCE_KEYS, batch_losses, compile_logprobs, compile_step

Callback = Callable[[int, Any, dict], dict | None]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "../shared/data/ultrafeedback/train.jsonl"
    columns: preference.ColumnMap = dataclasses.field(default_factory=preference.ColumnMap)
    split: str = "train"
    limit: int | None = None
    template: str = "auto"  # chat | plain | auto
    max_prompt_length: int | None = 512
    max_length: int | None = None
    pad_to_multiple: int = 64
    padding_side: str = "right"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "smollm2-135m-instruct"  # a checkpoint directory or a known model name
    output_dir: str = "runs/dpo"
    batch_size: int = 32  # pairs per step; rounded to a multiple of the data-parallel size
    num_epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": bf16 compute on float32 master weights
    param_dtype: str = "float32"  # stored weights and optimizer state ("bfloat16" halves them)
    remat: bool = False  # recompute each layer's activations in the backward pass
    unroll_layers: bool = False  # unrolled layer scan: faster steps on CPU, longer compile
    seq_chunk: int | None = None  # LM-head positions per chunk (bounds the logits' memory)
    reference: str = "cached"  # cached | on_the_fly
    checkpoint_every: int = 0  # steps; 0 saves only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir
    final_eval: bool = True  # log-probs of the whole dataset after training (summary.json)
    progress: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)

    def __post_init__(self):
        if self.reference not in ("cached", "on_the_fly"):
            raise ValueError(f"reference must be 'cached' or 'on_the_fly', got {self.reference!r}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")


@dataclasses.dataclass
class TrainResult:
    params: Any  # final parameters (global jax.Arrays)
    metrics: list[dict]  # one record per step, as in metrics.jsonl
    summary: dict  # as in summary.json
    init_logps: np.ndarray  # [num_pairs, 2] ln π_init(y±|x), in `pairs` order
    final_logps: np.ndarray | None  # [num_pairs, 2] after training (None without final_eval)
    output_dir: Path


def train(
    cfg: TrainConfig, *, model=None, pairs=None, callback: Callback | None = None, ref_logps=None
) -> TrainResult:
    """Train `model` (default: load `cfg.model`) on `pairs` (default: read `cfg.data`).

    callback(step, params, record) runs after every step; a dict it returns is merged into the
    step's metrics record. `params` are only valid during the call (the next step reuses them).
    ref_logps: `[len(pairs), 2]` ln π_ref(y±|x) under the initial `model`, computed by the caller
    (e.g. once for the union of many subsets, as E2 does); with it the loop skips its own cached
    reference pass. Only with `reference="cached"`.
    """
    if ref_logps is not None and (cfg.reference != "cached" or pairs is None):
        raise LdJaxError("ref_logps needs reference='cached' and in-memory pairs")
    out = Path(cfg.output_dir)
    main = distributed.is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if model is None:
        from ld_jax import models

        model = models.from_pretrained(cfg.model)
    model = model.with_options(
        dtype=cfg.compute_dtype, remat=cfg.remat, unroll_layers=cfg.unroll_layers
    )
    filter_summary = None
    if pairs is None:
        pairs, report = _read_pairs(cfg.data, model.tokenizer)
        filter_summary = report.summary()
        _say(main, cfg, f"data: {filter_summary}")

    mesh = sharding.make_mesh(cfg.mesh)
    per_device = sharding.batch_divisor(mesh)
    batch_size = -(-min(cfg.batch_size, len(pairs)) // per_device) * per_device
    rules = sharding.rules_for(model.config.family)
    param_shardings = sharding.tree_shardings(model.params, mesh, rules)
    params = sharding.put(model.params, param_shardings)
    if cfg.param_dtype != "float32":  # cast on the devices, already sharded
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    # The jitted functions see only the config (no weights), so later runs reuse their compilations.
    bare = dataclasses.replace(model, params=None, tokenizer=None)
    key = (model.config, mesh, cfg.seq_chunk)
    logprobs_fn = _reuse(("logprobs", key), lambda: compile_logprobs(bare, mesh, param_shardings, cfg.seq_chunk))
    pad_id = _pad_id(model)
    batches = dict(pad_id=pad_id, pad_to_multiple=cfg.data.pad_to_multiple, padding_side=cfg.data.padding_side)
    rows = feed.local_rows(mesh, batch_size)  # this process's rows of every global batch

    def all_logps(p):
        ds = pipeline.make_batches(pairs, batch_size, shuffle=False, rows=rows, **batches)
        return _dataset_logps(logprobs_fn, p, ds, mesh, batch_size, len(pairs), "log-probs", main and cfg.progress)

    ref_params = None
    if ref_logps is not None:
        init_logps = np.asarray(ref_logps, np.float32)  # make_batches checks its shape
    elif cfg.reference == "cached":
        salt = f"{batch_size}|{cfg.seq_chunk}|{batches}"  # anything that could move the last bit
        # (its own name: `key` keys the jitted step below, which must not depend on the data)
        ref_key = fingerprint(result_fields(model.config), salt, pairs_digest(pairs), params_digest(model.params))
        init_logps = _cached(out / f"ref_logps-{ref_key}.npz", lambda: all_logps(params), main, len(pairs))
    else:
        ref_params = jax.tree.map(lambda x: x.copy(), params)  # the step donates `params`
        init_logps = None
    ds = pipeline.make_batches(
        pairs, batch_size, rows=rows, seed=cfg.seed, num_epochs=cfg.num_epochs, ref_logps=init_logps,
        **batches,
    )  # fmt: skip
    total = len(ds) if cfg.max_steps is None else min(cfg.max_steps, len(ds))

    optimizer = make_optimizer(cfg.optimizer)
    state = init_state(params, optimizer)
    state_shardings = sharding.tree_shardings(state, mesh, rules)
    state = jax.device_put(state, state_shardings)
    example = _with_ref(ds[0], np.zeros((rows.stop - rows.start, 2), np.float32))
    step_fn = _reuse(
        ("step", key, cfg.loss, cfg.optimizer),
        lambda: compile_step(bare, cfg.loss, optimizer, mesh, state_shardings, example, cfg.seq_chunk),
    )

    ckpt = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    try:
        start = 0
        if cfg.resume and ckpt.latest_step() is not None:
            state, _ = ckpt.restore(ckpt.latest_step(), state, state_shardings)
            start = int(state.step)
            _say(main, cfg, f"resuming from the checkpoint at step {start}")
        records = _metrics_log(out / "metrics.jsonl", start, main)

        show = main and cfg.progress
        bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not show)
        for k in bar:
            batch = ds[k]
            if ref_params is not None:  # replicated [B, 2]: keep this process's rows
                batch = _with_ref(batch, np.asarray(logprobs_fn(ref_params, _seqs(batch, mesh, batch_size)))[rows])
            t0 = time.perf_counter()
            state, metrics = step_fn(state, feed.to_global(batch, mesh, batch_size))
            metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - t0
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                raise _non_finite(metrics, k + 1, ckpt)  # before any save: the bad state is never kept
            record = {"step": k + 1, **metrics, "tokens_per_s": metrics["tokens"] / seconds, "step_s": seconds}
            if callback is not None:
                record.update(callback(k + 1, state.params, record) or {})
            records.append(record)
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", dlogp_plus=f"{metrics['chosen_logp_change']:+.3f}")
            if (cfg.checkpoint_every and (k + 1) % cfg.checkpoint_every == 0) or k + 1 == total:
                ckpt.save(k + 1, state, {"step": k + 1})
    finally:
        ckpt.close()  # waits for pending saves, also when a step fails or the run is killed

    if init_logps is None and (cfg.final_eval or ref_params is not None):
        init_logps = all_logps(ref_params)
    final_logps = all_logps(state.params) if cfg.final_eval else None
    summary = _summary(cfg, records, init_logps, final_logps, pairs, filter_summary)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if final_logps is not None:
            np.savez(out / "logps.npz", index=[p.index for p in pairs], init=init_logps, final=final_logps)
    return TrainResult(state.params, records, summary, init_logps, final_logps, out)


# ---- pieces -------------------------------------------------------------------------------------

_JITTED: dict = {}  # jitted functions of earlier runs in this process (e.g. E2's many subsets)


def _reuse(key, build):
    if key not in _JITTED:
        if len(_JITTED) >= 16:
            _JITTED.clear()
        _JITTED[key] = build()
    return _JITTED[key]



def _read_pairs(data: DataConfig, tokenizer):
    if tokenizer is None:
        raise LdJaxError("the model has no tokenizer; pass tokenized pairs instead")
    records = preference.load_preferences(data.source, data.columns, data.split, data.limit)
    return formatting.tokenize_preferences(
        records, tokenizer, data.template, data.max_prompt_length, data.max_length
    )


def _non_finite(metrics: dict, step: int, ckpt: Checkpoints) -> LdJaxError:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the last good checkpoint is step {last} in {ckpt.directory}" if last else "no checkpoint was saved"
    return LdJaxError(
        f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at step "
        f"{step}; training stopped, {kept}"
    )


def _pad_id(model) -> int:
    tok = model.tokenizer
    for candidate in (getattr(tok, "pad_token_id", None), model.config.pad_token_id):
        if candidate is not None and 0 <= candidate < model.config.vocab_size:
            return int(candidate)
    return 0  # any id works: padding is masked out


def _with_ref(batch: dict, ref_logps: np.ndarray) -> dict:
    return {**batch, "ref_logps": np.asarray(ref_logps, np.float32)}


def _seqs(batch: dict, mesh, batch_size: int) -> dict:
    return feed.to_global({k: batch[k] for k in SEQUENCE_KEYS}, mesh, batch_size)


def _dataset_logps(logprobs_fn, params, ds, mesh, batch_size: int, n: int, desc: str, progress: bool) -> np.ndarray:
    """ln π(y±|x) `[n, 2]` for every pair, in input order. `ds`: this process's rows of the
    unshuffled single-epoch batches, so the padding rows are the last ones of the last batch."""
    out = []
    for k in tqdm(range(len(ds)), desc=desc, disable=not progress, leave=False):
        out.append(np.asarray(logprobs_fn(params, _seqs(ds[k], mesh, batch_size))))  # replicated
    return np.concatenate(out)[:n]


def _cached(path: Path, compute: Callable[[], np.ndarray], main: bool, n: int) -> np.ndarray:
    """Reference log-probs `[n, 2]` from `path` or `compute()` (then saved there by process 0).

    Process 0 decides and broadcasts the cached values, so the processes agree even when only
    process 0's disk has the file; all of them compute together otherwise (a collective)."""
    found = bool(distributed.broadcast_from_main(np.array(main and path.is_file(), np.int32)))
    if found:
        logps = np.load(path)["logps"] if main else np.zeros((n, 2), np.float32)
        return distributed.broadcast_from_main(np.asarray(logps, np.float32))
    logps = compute()
    if main:
        np.savez(path, logps=logps)
    return logps


def _metrics_log(path: Path, start: int, main: bool) -> list[dict]:
    """Records of steps <= start from an interrupted run; later lines are dropped from the file."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= start]
    if main:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _summary(cfg, records, init_logps, final_logps, pairs, filter_summary) -> dict:
    steps = records[1:] or records  # the first step includes compilation
    summary = {
        "steps": len(records),
        "pairs": len(pairs),
        "data_filter": filter_summary,
        "loss": cfg.loss.name,
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps])) if steps else None,
        "final_train_batch_loss": records[-1]["loss"] if records else None,
    }
    if final_logps is None:
        return summary
    lengths = np.array([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], np.float32)
    rewards = np.array([[p.reward_chosen or 0.0, p.reward_rejected or 0.0] for p in pairs], np.float32)

    def dataset_loss(logps):
        data = {"ref_logps": init_logps, "rewards": rewards}
        return float(np.mean(batch_losses(cfg.loss, logps, lengths, data)[0]))

    change = final_logps - init_logps
    loss_init, loss_final = dataset_loss(init_logps), dataset_loss(final_logps)
    loss_decreased = loss_final < loss_init
    chosen_change = float(change[:, 0].mean())
    summary.update(
        loss_init=loss_init,
        loss_final=loss_final,
        loss_decreased=loss_decreased,
        mean_chosen_logp_init=float(init_logps[:, 0].mean()),
        mean_chosen_logp_final=float(final_logps[:, 0].mean()),
        mean_chosen_logp_change=chosen_change,
        mean_rejected_logp_change=float(change[:, 1].mean()),
        fraction_pairs_displaced=float((change[:, 0] < 0).mean()),
        # SPEC §3 Definition 1
        likelihood_displacement=bool(loss_decreased and chosen_change < 0),
    )
    return summary


def _say(main: bool, cfg: TrainConfig, message: str) -> None:
    if main and cfg.progress:
        tqdm.write(message)
