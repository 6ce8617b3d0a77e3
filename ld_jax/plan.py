"""`ld-jax plan`: what a training config costs per device and per step, from shapes alone.

    p = make_plan(cfg, chip="v5p", step_time=2.0)   # cfg: a TrainConfig; nothing is allocated
    print(p.render())

- Parameters and optimizer state: `jax.eval_shape` of the model's parameter pytree and of
  `init_state`, laid out by the training partition rules on an `AbstractMesh` of the configured
  shape (no devices needed); bytes per device are the sums of the shard shapes.
- FLOPs per step: XLA's cost analysis of the lowered training step (`jit(...).lower(abstract
  args).cost_analysis()`). XLA counts a while-loop body once whatever its trip count, so the
  step is lowered with the layer scan unrolled, at 1 and 2 layers, and extrapolated:
  flops(L) = f1 + (L − 1)·(f2 − f1), exact because every layer is the same computation. "Model" FLOPs are without remat (the MFU
  convention); "executed" FLOPs include the recomputation that remat adds.
- Activations: an estimate from the shapes (formula in docs/scaling.md), since the real peak
  depends on the target's compiler.
- MFU = model FLOPs / (step time · devices · peak FLOP/s of the chip).

The model comes from `cfg.model`'s config.json, or, when that directory does not exist, from
`ld_jax.architectures` by its last path component (the paper's models, described as data).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from ld_jax import models
from ld_jax.architectures import ARCHITECTURES
from ld_jax.data.batch import PairBatch
from ld_jax.errors import LdJaxError
from ld_jax.models import loading, registry
from ld_jax.train import sharding
from ld_jax.train.config import TrainConfig
from ld_jax.train.optim import make_optimizer
from ld_jax.train.state import abstract_state
from ld_jax.train.step import train_step

# chip -> (peak dense bf16 FLOP/s per device, memory per device in bytes)
CHIPS = {
    "v5e": (197e12, 16 * 2**30),
    "v5p": (459e12, 95 * 2**30),
    "h100": (989e12, 80 * 2**30),  # SXM, dense (no sparsity)
    "h200": (989e12, 141 * 2**30),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    model: models.ModelConfig
    mesh: dict[str, int]
    devices: int
    batch_pairs: int  # pairs per step (one micro-batch)
    seq_len: int
    n_params: int  # from jax.eval_shape
    param_bytes: int  # per device
    grad_bytes: int  # per device (same dtype and layout as the params)
    opt_bytes: int  # per device
    act_bytes: int  # per device, estimate
    model_flops: float  # per step, all devices, without remat
    executed_flops: float  # per step, all devices, as compiled (with remat recomputation)
    param_dtype: str = "float32"
    lr: float = 0.0
    chip: str | None = None
    step_time: float | None = None

    @property
    def tokens(self) -> int:
        return 2 * self.batch_pairs * self.seq_len

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.opt_bytes + self.act_bytes

    def mfu(self, step_time: float) -> float:
        return self.model_flops / (step_time * self.devices * CHIPS[self.chip][0])

    def step_time_at(self, mfu: float) -> float:
        return self.model_flops / (mfu * self.devices * CHIPS[self.chip][0])

    def render(self) -> str:
        m, gb = self.model, lambda b: f"{b / 1e9:.2f} GB"
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            (
                "model",
                f"{self.name} ({m.family}): {self.n_params / 1e9:.3f}B parameters (jax.eval_shape), "
                f"{m.n_layers} layers, d_model {m.d_model}, d_ff {m.d_ff}, vocab {m.vocab_size}",
            ),
            (
                "mesh",
                f"{mesh} ({self.devices} devices)"
                + (
                    f", {self.chip}: {CHIPS[self.chip][0] / 1e12:.0f} "
                    f"TFLOP/s bf16, {CHIPS[self.chip][1] / 2**30:.0f} GiB each"
                    if self.chip
                    else ""
                ),
            ),
            (
                "batch",
                f"{self.batch_pairs} pairs x 2 x {self.seq_len} tokens = {self.tokens} tokens/step "
                f"({self.batch_pairs / (self.mesh['data'] * self.mesh['fsdp']):g} pairs per device)",
            ),
            (
                "per device",
                f"params {gb(self.param_bytes)} | grads {gb(self.grad_bytes)} | optimizer "
                f"{gb(self.opt_bytes)} | activations ~{gb(self.act_bytes)} (estimate) | "
                f"total ~{gb(self.total_bytes)}",
            ),
            (
                "FLOPs/step",
                f"model {self.model_flops:.4g} (XLA cost analysis, no remat), executed "
                f"{self.executed_flops:.4g} (as configured); "
                f"{self.model_flops / self.tokens:.4g} per token",
            ),
        ]
        if self.param_dtype == "bfloat16":
            # round-to-nearest drops an update below half an ulp, |w|·2^-9 for bf16's 8-bit
            # significand; RMSProp's steady-state step is about lr, so weights above lr·2^9 freeze
            lines.append(
                (
                    "warning",
                    f"bfloat16 parameters drop updates of size ~lr={self.lr:g} on every "
                    f"weight with |w| > {self.lr * 2**9:.2g}: keep float32 master weights",
                )
            )
        if self.chip:
            cap = CHIPS[self.chip][1]
            fits = self.total_bytes <= cap
            lines.append(
                (
                    "memory",
                    f"{'fits' if fits else 'does NOT fit'} in {gb(cap)} ({cap / 2**30:.0f} GiB): "
                    f"{100 * self.total_bytes / cap:.0f}% used",
                )
            )
            t50 = self.step_time_at(0.5)
            lines.append(("at 50% MFU", f"{t50:.3g} s/step, {self.tokens / t50:,.0f} tokens/s"))
            if self.step_time:
                lines.append(
                    (
                        "MFU",
                        f"{100 * self.mfu(self.step_time):.1f}% at {self.step_time:g} s/step "
                        f"({self.tokens / self.step_time:,.0f} tokens/s)",
                    )
                )
        else:
            lines.append(
                ("MFU", "give --chip (v5e, v5p, h100, h200) for peak FLOP/s, memory and MFU")
            )
            if self.step_time:
                lines.append(
                    (
                        "achieved",
                        f"{self.model_flops / self.step_time / 1e9:.3g} GFLOP/s in all at "
                        f"{self.step_time:g} s/step ({self.tokens / self.step_time:,.1f} tokens/s)",
                    )
                )
        return "\n".join(f"{k:<12}{v}" for k, v in lines)


def model_config(name_or_dir: str) -> tuple[str, models.ModelConfig]:
    """(display name, ModelConfig) from a checkpoint directory's config.json, or from the
    built-in description of a paper model named by the directory's last component."""
    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path.name, loading.read_config(path)
    if path.name in ARCHITECTURES:
        return path.name, models.from_hf_config(dict(ARCHITECTURES[path.name]))
    try:
        return path.name, loading.read_config(loading.resolve(name_or_dir))  # a known PyPI model
    except LdJaxError as e:
        raise LdJaxError(f"{e}; built-in architectures: {', '.join(ARCHITECTURES)}") from None


def abstract_params(config: models.ModelConfig, dtype: str = "float32"):
    """The parameter pytree as ShapeDtypeStructs (nothing is allocated), laid out as
    `loading.load_params` lays out a checkpoint: the family's registry entry says how."""
    return registry.family(config.family).abstract_params(config, dtype)


def abstract_mesh(cfg: sharding.MeshConfig, devices: int | None) -> AbstractMesh:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if -1 in sizes:
        if devices is None:
            raise LdJaxError(f"mesh {sizes} has a -1 size: give --devices N")
        sizes[sizes.index(-1)] = devices // math.prod(s for s in sizes if s != -1)
    if devices is not None and math.prod(sizes) != devices:
        raise LdJaxError(f"mesh {sizes} does not have {devices} devices")
    return AbstractMesh(tuple(sizes), sharding.AXES, axis_types=(AxisType.Auto,) * 3)


def bytes_per_device(tree, mesh: AbstractMesh, rules) -> int:
    """Sum over leaves of the shard shape (partition rules on `mesh`) times the item size."""
    shardings = sharding.tree_shardings(tree, mesh, rules)
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x, s in zip(
            jax.tree.leaves(tree),
            jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding)),
        )
    )


def step_flops(
    cfg: TrainConfig,
    config: models.ModelConfig,
    batch_pairs: int,
    seq_len: int,
    remat: bool,
    rows_per_pair: int = 2,
    target_len: int | None = None,
) -> float:
    """FLOPs of one training step on the global batch of `batch_pairs` pairs, each
    `rows_per_pair` rows of `seq_len` with `target_len` response positions (the paired layout by
    default), from XLA's cost analysis of the lowered step at 0 and 1 layers (module
    docstring). Lowering only traces shapes."""
    optimizer = make_optimizer(cfg.optimizer)
    batch = PairBatch.abstract(batch_pairs, seq_len, rows_per_pair, target_len)

    def cost(n_layers: int) -> float:
        c = config.replace(
            n_layers=n_layers,
            layer_types=config.layer_types[:n_layers],
            remat=remat,
            dtype=cfg.compute_dtype,
            unroll_layers=True,
        )  # the layer scan, unrolled
        lm = models.LanguageModel.build(c, None)
        state = abstract_state(abstract_params(c, cfg.param_dtype), optimizer)

        def step(state, batch):  # seq_chunk=None: the chunk loop would also be counted once
            return train_step(state, batch, model=lm, loss_cfg=cfg.loss, optimizer=optimizer)

        # micro_batches=1 and seq_chunk=None: no scan is left but the layer scan, and that one
        # is unrolled explicitly (unroll_layers), since XLA counts a loop body once.
        return float(jax.jit(step).lower(state, batch).cost_analysis()["flops"])

    f1, f2 = cost(1), cost(2)
    return f1 + (config.n_layers - 1) * (f2 - f1)


def activation_bytes(
    cfg: TrainConfig, c: models.ModelConfig, mesh: dict[str, int], batch_pairs: int, seq_len: int
) -> int:
    """Per-device activation estimate (docs/scaling.md): with remat, the L saved layer inputs plus
    one layer's live set (the saved inputs in host memory with `offload_activations`); without,
    L live sets; plus the LM head's float32 logits."""
    a = DTYPE_BYTES[cfg.compute_dtype]
    t_par = mesh["tensor"]
    seqs = 2 * batch_pairs / (mesh["data"] * mesh["fsdp"])  # sequences per device
    tokens = seqs * seq_len
    per_token = 5 * c.d_model + (2 * c.q_dim + 2 * c.kv_dim + 3 * c.d_ff) / t_par  # saved per layer
    scores = seqs * (c.n_heads / t_par) * seq_len * seq_len * 4  # float32 softmax probabilities
    layer = tokens * per_token * a + scores
    if cfg.remat:
        inputs = 0 if cfg.offload_activations else c.n_layers * tokens * c.d_model * a
        saved = inputs + 2 * layer
    else:
        saved = c.n_layers * layer
    head_positions = seqs * min(cfg.seq_chunk or seq_len, seq_len)
    logits = 3 * head_positions * c.vocab_size / t_par * 4  # logits, log-softmax, their gradient
    return int(saved + logits)


def make_plan(
    cfg: TrainConfig,
    chip: str | None = None,
    step_time: float | None = None,
    devices: int | None = None,
) -> Plan:
    if chip is not None and chip not in CHIPS:
        raise LdJaxError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)}")
    if step_time is not None and step_time <= 0:
        raise LdJaxError("--step-time must be positive")
    name, config = model_config(cfg.model)
    mesh = abstract_mesh(cfg.mesh, devices)
    sizes = dict(zip(sharding.AXES, mesh.axis_sizes))
    divisor = sizes["data"] * sizes["fsdp"]
    batch_pairs = -(-cfg.batch_size // divisor) * divisor  # as the loop rounds it
    seq_len = cfg.data.max_length or 512
    seq_len = cfg.data.pad_to_multiple * math.ceil(seq_len / cfg.data.pad_to_multiple)

    rules = sharding.rules_for(config.family)
    params = abstract_params(config, cfg.param_dtype)
    state = abstract_state(params, make_optimizer(cfg.optimizer))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    param_bytes = bytes_per_device(state.params, mesh, rules)
    return Plan(
        name=name,
        model=config,
        mesh=sizes,
        devices=math.prod(mesh.axis_sizes),
        batch_pairs=batch_pairs,
        seq_len=seq_len,
        n_params=n_params,
        param_bytes=param_bytes,
        grad_bytes=param_bytes,
        opt_bytes=bytes_per_device(state.opt_state, mesh, rules),
        act_bytes=activation_bytes(cfg, config, sizes, batch_pairs, seq_len),
        model_flops=step_flops(cfg, config, batch_pairs, seq_len, remat=False),
        executed_flops=step_flops(cfg, config, batch_pairs, seq_len, remat=cfg.remat),
        param_dtype=cfg.param_dtype,
        lr=cfg.optimizer.lr,
        chip=chip,
        step_time=step_time,
    )
