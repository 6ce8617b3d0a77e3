"""`ld-jax plan --topology NAME`: the training step compiled by the TPU compiler for a TPU slice
that this host does not have, and the compiler's per-device memory.

    report = compile_plan(cfg, "v5e:2x4")      # cfg: a TrainConfig; needs libtpu (`.[tpu]`)
    report["compiled"]["peak_bytes"], report["fits"]

`jax.experimental.topologies.get_topology_desc` returns the devices of a slice from libtpu's
description of it, without any TPU attached. The configured mesh is laid over those devices and
the *same* jitted, sharded, donated step that `ld-jax train` runs (`train.step.compile_step`,
with the loop's batch layout, remat, seq_chunk and dtypes) is lowered with abstract parameters,
optimizer state and batch (`jax.ShapeDtypeStruct`s carrying their shardings: nothing is
allocated) and compiled. `memory_analysis()` gives the per-device bytes of the arguments,
outputs, aliased (donated) buffers and temporaries; the peak is
argument + output − alias + temporaries, the live set while the step runs (MaxText's
`train_compile.py` counts it the same way). The reference log-prob pass and the CHES kernel are
compiled for the same mesh and reported the same way.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from ld_jax import ches, models
from ld_jax.data.batch import PairBatch
from ld_jax.data.formatting import TokenizedPair
from ld_jax.data.pipeline import padded_lengths
from ld_jax.errors import LdJaxError
from ld_jax.models.constraints import batch_sharded
from ld_jax.plan import abstract_params, make_plan, model_config, step_flops
from ld_jax.train import feed, sharding
from ld_jax.train.config import TrainConfig, model_options
from ld_jax.train.optim import make_optimizer
from ld_jax.train.state import abstract_state
from ld_jax.train.step import compile_logprobs, compile_step

# TPU generation (the prefix of a topology name) -> (device_kind libtpu reports, HBM per chip).
# HBM sizes are Google Cloud's published per-chip figures.
TPU_CHIPS = {
    "v4": ("TPU v4", 32 * 2**30),
    "v5e": ("TPU v5 lite", 16 * 2**30),
    "v5p": ("TPU v5", 95 * 2**30),
    "v6e": ("TPU v6 lite", 32 * 2**30),
}
# Slice shapes offered per generation (chips per axis); v4/v5p are 3-D tori, v5e/v6e 2-D.
TOPOLOGIES = (
    *(f"v5e:{s}" for s in ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    *(f"v6e:{s}" for s in ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    *(f"v5p:{s}" for s in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8")),
    *(f"v4:{s}" for s in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8")),
)
ANALYSIS_KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")


def topology_devices(name: str) -> list:
    """The devices of the TPU slice `name` (e.g. "v5e:2x4"), from libtpu; no TPU needed."""
    if name not in TOPOLOGIES:
        raise LdJaxError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    try:
        import libtpu  # noqa: F401  (the compiler; get_topology_desc's own error is cryptic)
        from jax.experimental import topologies
    except ImportError:
        raise LdJaxError(
            "--topology needs libtpu, the TPU compiler: pip install 'ld-jax[tpu]'"
        ) from None
    # libtpu takes a host-wide lock meant for processes that own TPUs; compiling owns none, so
    # two plans (or a plan and a test) may run at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    want = TPU_CHIPS[name.split(":")[0]][0]
    if devices[0].device_kind != want:  # our table and libtpu disagree: trust neither
        raise LdJaxError(f"{name}: libtpu reports {devices[0].device_kind!r}, expected {want!r}")
    return devices


def memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable (keys ANALYSIS_KEYS)."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        # host memory (offloaded optimizer state): not in the device peak
        "host_argument_bytes": int(getattr(m, "host_argument_size_in_bytes", 0)),
        "host_output_bytes": int(getattr(m, "host_output_size_in_bytes", 0)),
        "host_temp_bytes": int(getattr(m, "host_temp_size_in_bytes", 0)),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying their shardings: what `lower` needs, nothing allocated."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def batch_shape(cfg: TrainConfig, prompt_len: int = 1) -> tuple[int, int, int]:
    """(R, S, T) of the longest batch `cfg`'s data can make in its layout: every pair with a
    `prompt_len`-token prompt and two replies filling `max_length` (`data.pipeline`'s own
    padding rules). The default prompt of 1 token is the worst case of the packed layout,
    whose row holds both replies; a longer prompt gives a typical rather than a bound shape."""
    n = cfg.data.max_length or 512
    reply = [0] * (n - prompt_len)
    pair = TokenizedPair(0, [0] * prompt_len, reply, reply)
    seq, targets = padded_lengths([pair], cfg.data.pad_to_multiple, cfg.data.layout)
    return (2 if cfg.data.layout == "paired" else 1), seq, targets


def _compile_pass(fn, *args, hbm: int) -> tuple[object | None, dict]:
    """Lower and compile `fn(*args)`: the executable and its record (the `memory` keys,
    `compile_s`, `fits`), or None and `{fits: False, compiler_error}` when the TPU compiler
    refuses the program for want of HBM (it gives no memory analysis then)."""
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, {"fits": False, "compiler_error": str(e).strip().splitlines()[0]}
    record = {**memory(compiled), "compile_s": round(time.perf_counter() - t0, 1)}
    record["fits"] = record["peak_bytes"] <= hbm
    return compiled, record


def compile_plan(
    cfg: TrainConfig,
    topology: str,
    passes: tuple[str, ...] = ("train", "reference", "ches"),
    prompt_len: int = 1,
) -> dict:
    """Compile `cfg`'s training step (and the reference and CHES passes) for `topology`, on
    batches of `batch_shape(cfg, prompt_len)` (the default: the worst case).

    Returns the JSON record of `ld-jax plan --topology` (keys in the module docstring)."""
    devices = topology_devices(topology)
    chip = topology.split(":")[0]
    hbm = TPU_CHIPS[chip][1]
    mesh = sharding.make_mesh(cfg.mesh, devices)
    name, config = model_config(cfg.model)
    config = config.replace(**model_options(cfg))
    lm = models.LanguageModel.build(config, None)  # the loop's `bare` model: no weights
    rules = sharding.rules_for(config.family)
    # the loop's layout; a paper config's data has more pairs than one batch
    layout = feed.batch_layout(
        cfg.batch_size, cfg.batch_size, mesh, cfg.optimizer.grad_accum_steps, cfg.strict_batch
    )
    rows_per_pair, seq_len, target_len = batch_shape(cfg, prompt_len)
    optimizer = make_optimizer(cfg.optimizer)
    params = abstract_params(config, cfg.param_dtype)
    state = abstract_state(params, optimizer)
    state_shardings = sharding.tree_shardings(state, mesh, rules)
    if cfg.offload_optimizer_state:
        state_shardings = sharding.offload_optimizer_state(state_shardings)
    param_shardings = sharding.tree_shardings(params, mesh, rules)
    report = {
        "config": cfg.model,
        "model": name,
        "topology": topology,
        "chip": chip,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "hbm_bytes": hbm,
        "batch": {
            "pairs": layout.pairs,
            "rows": layout.rows,
            "micro_batches": layout.micro_batches,
            "layout": cfg.data.layout,
            "prompt_len": prompt_len,
            "rows_per_pair": rows_per_pair,
            "seq_len": seq_len,
            "target_len": target_len,
            "positions_per_step": rows_per_pair * layout.rows * seq_len,
            "lm_head_positions_per_step": rows_per_pair * layout.rows * target_len,
            "pairs_per_device_per_micro_batch": layout.eval_rows // layout.devices,
        },
        "options": {
            "remat": cfg.remat,
            "seq_chunk": cfg.seq_chunk,
            "compute_dtype": cfg.compute_dtype,
            "param_dtype": cfg.param_dtype,
            "offload_optimizer_state": cfg.offload_optimizer_state,
            "offload_activations": cfg.offload_activations,
        },
    }
    if "train" in passes:
        batch = PairBatch.abstract(layout.rows, seq_len, rows_per_pair, target_len)
        step = compile_step(
            lm,
            cfg.loss,
            optimizer,
            mesh,
            state_shardings,
            batch,
            cfg.seq_chunk,
            layout.micro_batches,
        )
        batch = _abstract(batch, sharding.batch_shardings(batch, mesh))
        compiled, record = _compile_pass(step, _abstract(state, state_shardings), batch, hbm=hbm)
        report["fits"] = record.pop("fits")
        if compiled is None:
            report.update(record, headroom_ok=False)
        else:
            report["compile_s"] = record.pop("compile_s")
            report["compiled"] = record
            # a while-loop body is costed once (plan.step_flops), so this undercounts the layers
            flops = compiled.cost_analysis().get("flops")
            report["compiled_flops_per_device_loop_bodies_once"] = flops
            # the whole step's FLOPs on this batch shape and layout (layers unrolled, XLA's)
            report["step_flops"] = step_flops(
                cfg, config, layout.rows, seq_len, cfg.remat, rows_per_pair, target_len
            )
            report["headroom_ok"] = record["peak_bytes"] <= 0.9 * hbm
    if "reference" in passes:  # the loop's reference / final-eval pass: eval_rows per batch
        fn = compile_logprobs(lm, mesh, param_shardings, cfg.seq_chunk)
        seqs = PairBatch.abstract(layout.eval_rows, seq_len, rows_per_pair, target_len)
        seqs = seqs.sequences()
        seqs = _abstract(seqs, sharding.batch_shardings(seqs, mesh))
        args = (_abstract(params, param_shardings), seqs)
        report["reference"] = _compile_pass(fn, *args, hbm=hbm)[1]
    if "ches" in passes:
        shape = (rows_per_pair, seq_len, target_len)
        report["ches"] = _compile_ches(cfg, lm, mesh, params, param_shardings, shape, hbm)
    return report


def _compile_ches(cfg, lm, mesh, params, param_shardings, shape, hbm) -> dict:
    """CHES's kernel as `ches.score_batches(lm, pairs, mesh=mesh)` runs it: ScoringConfig's
    default 8 pairs per batch (rounded to the mesh), weights in the compute dtype laid out by
    the partition rules, activations split over the batch."""
    rows = feed.batch_layout(8, 8, mesh).rows
    dtype = jnp.dtype(cfg.compute_dtype)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
    data = NamedSharding(mesh, sharding.BATCH)
    seqs = PairBatch.abstract(rows, *shape).sequences()
    seqs = _abstract(seqs, sharding.batch_shardings(seqs, mesh))
    with batch_sharded(data):
        args = (lm.hidden_states, _abstract(params, param_shardings), seqs)
        out = _compile_pass(ches.ches_kernel, *args, hbm=hbm)[1]
    return {**out, "rows": rows}


def with_estimate(report: dict, cfg: TrainConfig) -> dict:
    """`report` plus the formula estimate of `plan.make_plan` for the same config and chip."""
    chip = report["chip"] if report["chip"] in ("v5e", "v5p") else None
    p = make_plan(cfg, chip=chip, devices=report["devices"])
    est = {
        "param_bytes": p.param_bytes,
        "grad_bytes": p.grad_bytes,
        "opt_bytes": p.opt_bytes,
        "act_bytes": p.act_bytes,
        "total_bytes": p.total_bytes,
        "model_flops_per_step": p.model_flops,
        "executed_flops_per_step": p.executed_flops,
    }
    if "compiled" in report:
        est["compiled_peak_over_estimate"] = report["compiled"]["peak_bytes"] / p.total_bytes
    return {**report, "estimate": est}


def render(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    b = report["batch"]
    lines = [
        ("model", f"{report['model']} on {report['topology']} ({report['devices']} chips, {mesh})"),
        (
            "batch",
            f"{b['pairs']} pairs ({b['rows']} rows) x {b['rows_per_pair']} x {b['seq_len']} = "
            f"{b['positions_per_step']} positions/step ({b['layout']}, LM head on "
            f"{b['lm_head_positions_per_step']}) in {b['micro_batches']} micro-batch(es)",
        ),
    ]
    hbm = report["hbm_bytes"]
    if "compiler_error" in report:  # the train step, refused
        lines.append(("train step", f"does NOT fit: {report['compiler_error']}"))
    for key, label in (("compiled", "train step"), ("reference", "reference"), ("ches", "ches")):
        if key not in report:
            continue
        m = report[key]
        if "compiler_error" in m:
            lines.append((label, f"does NOT fit: {m['compiler_error']}"))
            continue
        lines.append(
            (
                label,
                f"args {gib(m['argument_bytes'])} + out {gib(m['output_bytes'])} - alias "
                f"{gib(m['alias_bytes'])} + temp {gib(m['temp_bytes'])} = peak "
                f"{gib(m['peak_bytes'])} of {gib(hbm)} ({100 * m['peak_bytes'] / hbm:.0f}%): "
                f"{'fits' if m['peak_bytes'] <= hbm else 'does NOT fit'}",
            )
        )
    if "estimate" in report:
        e = report["estimate"]
        ratio = e.get("compiled_peak_over_estimate")
        lines.append(
            (
                "estimate",
                f"formula total {gib(e['total_bytes'])}"
                + (f"; compiled peak / estimate = {ratio:.2f}" if ratio else ""),
            )
        )
    return "\n".join(f"{k:<12}{v}" for k, v in lines)


__all__ = ["compile_plan", "with_estimate", "render", "TOPOLOGIES"]
