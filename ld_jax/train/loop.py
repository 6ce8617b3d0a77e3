"""The one preference-training loop. Experiments configure it (`TrainConfig`) and call `train`.

    result = train(cfg)                                  # data and model from the config
    result = train(cfg, model=lm, pairs=pairs, callback=fn)  # in-memory, from Python

What it does: tokenized pairs -> reference log-probs (`train.reference`, computed once with the
initial model and cached next to the run; or recomputed for every batch with
`reference="on_the_fly"`) -> grain batches (deterministic by seed) -> the jitted sharded step
(one optimizer update per step, micro-batched inside it), with a progress bar, `metrics.jsonl`,
orbax checkpoints every `checkpoint_every` steps and automatic resume from the latest one
(refused when the checkpoint was written for another config, data or model), a stop on a
non-finite loss that leaves the last good checkpoint alone, and a final evaluation over the
whole dataset written to `summary.json`: did likelihood displacement occur (SPEC §3
Definition 1: the loss went down and so did the mean ln π(y+|x))?
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ld_jax import distributed, files, models
from ld_jax.config import to_dict
from ld_jax.data import formatting, pipeline, preference
from ld_jax.data.batch import PairBatch
from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig
from ld_jax.train import feed, reference, run_dir, sharding, writers
from ld_jax.train.checkpoint import Checkpoints
from ld_jax.train.config import DataConfig, TrainConfig, model_options, run_identity
from ld_jax.train.optim import make_optimizer
from ld_jax.train.state import init_state
from ld_jax.train.step import PER_PAIR, batch_losses, compile_step

Callback = Callable[[int, Any, dict], dict | None]


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
    if model is None:
        model = models.from_pretrained(cfg.model)
    model = model.with_options(**model_options(cfg))
    filter_summary = None
    if pairs is None:
        pairs, report = _read_pairs(cfg.data, model.tokenizer)
        filter_summary = report.summary()
        _say(main, cfg, f"data: {filter_summary}")
    _check_rewards(cfg.loss, pairs)
    if ref_logps is None and cfg.reference == "cached":
        ref_logps = data_reference(pairs)  # TRL's ref_chosen_logps / ref_rejected_logps columns
        if ref_logps is not None:
            _say(main, cfg, "reference: the data's ref_chosen_logps / ref_rejected_logps")
    with run_dir.locked(out) if main else contextlib.nullcontext():
        return _train(cfg, model, pairs, callback, ref_logps, filter_summary)


def _train(cfg: TrainConfig, model, pairs, callback, ref_logps, filter_summary) -> TrainResult:
    """`train` once the inputs are known and the run directory is this process's."""
    out, main = Path(cfg.output_dir), distributed.is_main_process()
    mesh = sharding.make_mesh(cfg.mesh)
    layout = feed.batch_layout(
        cfg.batch_size, len(pairs), mesh, cfg.optimizer.grad_accum_steps, cfg.strict_batch
    )
    _say(main, cfg, f"batch: {layout.describe()}")
    ckpt = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    identity = run_identity(cfg, model, pairs, ref_logps)
    start = run_dir.resume_step(cfg, ckpt, identity)
    if main:
        files.write_json(out / "config.json", to_dict(cfg), indent=2)

    rules = sharding.rules_for(model.config.family)
    param_shardings = sharding.tree_shardings(model.params, mesh, rules)
    params = sharding.put(model.params, param_shardings)
    if cfg.param_dtype != "float32":  # cast on the devices, already sharded
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    padding = reference.Padding(
        models.pad_id(model), cfg.data.pad_to_multiple, cfg.data.padding_side, cfg.data.layout
    )

    def all_logps(p, desc):
        return reference.dataset_logps(
            model,
            p,
            pairs,
            mesh,
            layout.eval_rows,
            padding=padding,
            seq_chunk=cfg.seq_chunk,
            progress=main and cfg.progress,
            desc=desc,
        )

    ref_params = None
    if ref_logps is not None:
        init_logps = np.asarray(ref_logps, np.float32)  # make_batches checks its shape
    elif not (
        cfg.loss.needs_reference or cfg.final_eval
    ):  # neither the loss nor the summary reads it
        init_logps = np.zeros((len(pairs), 2), np.float32)
    elif cfg.reference == "cached":
        init_logps = reference.reference_logps(
            model,
            pairs,
            mesh,
            rows=layout.eval_rows,
            params=params,
            param_dtype=cfg.param_dtype,
            seq_chunk=cfg.seq_chunk,
            padding=padding,
            cache_dir=out,
            progress=main and cfg.progress,
        )
    else:
        ref_params = jax.tree.map(lambda x: x.copy(), params)  # the step donates `params`
        init_logps = None
    rows = feed.local_rows(mesh, layout.rows)  # this process's rows of every global batch
    ds = pipeline.make_batches(
        pairs,
        layout.pairs,
        rows=rows,
        padded_rows=layout.rows,
        seed=cfg.seed,
        num_epochs=cfg.num_epochs,
        ref_logps=init_logps,
        drop_remainder=cfg.drop_last,
        **dataclasses.asdict(padding),
    )
    total = len(ds) if cfg.max_steps is None else min(cfg.max_steps, len(ds))

    optimizer = make_optimizer(cfg.optimizer)
    state = init_state(params, optimizer)
    state_shardings = sharding.tree_shardings(state, mesh, rules)
    if cfg.offload_optimizer_state:
        state_shardings = sharding.offload_optimizer_state(state_shardings)
    state = jax.device_put(state, state_shardings)
    example = ds[0].with_ref(np.zeros((rows.stop - rows.start, 2), np.float32))
    bare = dataclasses.replace(model, params=None, tokenizer=None)
    step_fn = reference.reuse(
        (
            "step",
            model.config,
            mesh,
            cfg.seq_chunk,
            cfg.loss,
            cfg.optimizer,
            cfg.offload_optimizer_state,
        ),
        lambda: compile_step(
            bare,
            cfg.loss,
            optimizer,
            mesh,
            state_shardings,
            example,
            cfg.seq_chunk,
            layout.micro_batches,
        ),
    )
    ref_fn = (
        None
        if ref_params is None
        else reference.logprobs_function(model, mesh, param_shardings, cfg.seq_chunk)
    )

    initial_logps = None  # TR-DPO moves the reference: the summary needs the initial model's
    if cfg.ref_sync_every and cfg.final_eval:
        initial_logps = all_logps(ref_params, "initial log-probs")
    log = writers.Writers([])  # opened in the try, so that a failing open still closes ckpt
    try:
        if start:
            state, _ = ckpt.restore(start, state, state_shardings)
            if cfg.ref_sync_every:
                ref_params = ckpt.restore_reference(start, ref_params, param_shardings)
            _say(main, cfg, f"resuming from the checkpoint at step {start}")
        records = run_dir.metrics_log(out / "metrics.jsonl", start, main)
        log = writers.open_writers(cfg.logging, out, to_dict(cfg), start, main)

        show = main and cfg.progress
        bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not show)
        for k in bar:
            batch = ds[k]
            if ref_fn is not None:  # replicated [B, 2]: keep this process's rows
                seqs = feed.to_global(batch.sequences(), mesh, layout.rows)
                batch = batch.with_ref(np.asarray(ref_fn(ref_params, seqs))[rows])
            t0 = time.perf_counter()
            state, metrics = step_fn(state, feed.to_global(batch, mesh, layout.rows))
            metrics = jax.device_get(metrics)
            per_pair = metrics.pop(PER_PAIR)
            metrics = {name: float(v) for name, v in metrics.items()}
            metrics.update(writers.displacement(per_pair))
            seconds = time.perf_counter() - t0
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                raise _non_finite(
                    metrics, k + 1, ckpt
                )  # before any save: the bad state is never kept
            record = {
                "step": k + 1,
                **metrics,
                "tokens_per_s": metrics["tokens"] / seconds,
                "step_s": seconds,
            }
            if callback is not None:
                record.update(callback(k + 1, state.params, record) or {})
            records.append(record)
            log.write(k + 1, record)  # before the checkpoint: its steps always have their lines
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", dlogp_plus=f"{metrics['chosen_logp_change']:+.3f}"
            )
            if cfg.ref_sync_every and (k + 1) % cfg.ref_sync_every == 0:
                ref_params = reference.sync_reference(ref_params, state.params, cfg.ref_mixup_alpha)
            if (cfg.checkpoint_every and (k + 1) % cfg.checkpoint_every == 0) or k + 1 == total:
                meta = {"step": k + 1, "identity": identity}
                ckpt.save(k + 1, state, meta, reference=ref_params if cfg.ref_sync_every else None)
    finally:
        ckpt.close()  # waits for pending saves, also when a step fails or the run is killed
        log.close()

    if initial_logps is not None:
        init_logps = initial_logps
    elif init_logps is None and (cfg.final_eval or ref_params is not None):
        init_logps = all_logps(ref_params, "reference log-probs")
    final_logps = all_logps(state.params, "final log-probs") if cfg.final_eval else None
    summary = _summary(cfg, layout, records, init_logps, final_logps, pairs, filter_summary)
    if main:
        files.write_json(out / "summary.json", summary, indent=2)
        if final_logps is not None:
            files.save_npz(
                out / "logps.npz",
                index=[p.index for p in pairs],
                init=init_logps,
                final=final_logps,
            )
    return TrainResult(state.params, records, summary, init_logps, final_logps, out)


# ---- pieces -------------------------------------------------------------------------------------


def _read_pairs(data: DataConfig, tokenizer):
    if tokenizer is None:
        raise LdJaxError("the model has no tokenizer; pass tokenized pairs instead")
    records = preference.load_preferences(data.source, data.columns, data.split, data.limit)
    return formatting.tokenize_preferences(
        records, tokenizer, data.template, data.max_prompt_length, data.max_length
    )


def _check_rewards(loss: LossConfig, pairs) -> None:
    if not loss.needs_rewards:
        return
    missing = [p.index for p in pairs if p.reward_chosen is None or p.reward_rejected is None]
    if missing:
        raise LdJaxError(
            f"loss {loss.name!r} needs rewards, but {len(missing)} of {len(pairs)} pairs have none "
            f"(first: record {missing[0]}); map them with data.columns.reward_chosen/reward_rejected"
        )


def data_reference(pairs) -> np.ndarray | None:
    """`[len(pairs), 2]` reference log-probs that the data carries (every pair or none), or
    None."""
    given = [p.ref_logps is not None for p in pairs]
    if not any(given):
        return None
    if not all(given):
        first = next(p.index for p in pairs if p.ref_logps is None)
        raise LdJaxError(
            f"{given.count(False)} of {len(pairs)} pairs lack ref_chosen_logps/ref_rejected_logps "
            f"(first: record {first}); give them for every pair or for none"
        )
    return np.array([p.ref_logps for p in pairs], np.float32)


def _non_finite(metrics: dict, step: int, ckpt: Checkpoints) -> LdJaxError:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (
        f"the last good checkpoint is step {last} in {ckpt.directory}"
        if last
        else "no checkpoint was saved"
    )
    return LdJaxError(
        f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at step "
        f"{step}; training stopped, {kept}"
    )


def _summary(cfg, layout, records, init_logps, final_logps, pairs, filter_summary) -> dict:
    steps = records[1:] or records  # the first step includes compilation
    per_epoch = len(pairs) // layout.pairs if cfg.drop_last else -(-len(pairs) // layout.pairs)
    summary = {
        "steps": len(records),
        "pairs": len(pairs),
        "data_filter": filter_summary,
        "loss": cfg.loss.name,
        "batch": {
            "pairs_per_update": layout.pairs,
            "requested_batch_size": layout.requested,
            "rows_per_step": layout.rows,
            "padding_rows_per_step": layout.padding,
            "micro_batches": layout.micro_batches,
            "data_parallel_devices": layout.devices,
            "updates_per_epoch": per_epoch,
            "dropped_pairs_per_epoch": len(pairs) - per_epoch * layout.pairs
            if cfg.drop_last
            else 0,
        },
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps])) if steps else None,
        "final_train_batch_loss": records[-1]["loss"] if records else None,
    }
    if final_logps is None:
        return summary
    lengths = np.array([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], np.float32)
    rewards = np.array(
        [[p.reward_chosen or 0.0, p.reward_rejected or 0.0] for p in pairs], np.float32
    )

    def dataset_loss(logps):
        data = PairBatch(None, None, None, rewards=rewards, ref_logps=init_logps)
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
