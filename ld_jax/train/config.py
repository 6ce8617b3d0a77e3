"""What one training run is (`TrainConfig`, with its `DataConfig`) and the identity a resumed
run must share with its checkpoint (`run_identity`). Read from YAML by `ld_jax.config`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ld_jax.config import to_dict
from ld_jax.data import preference
from ld_jax.data.batch import DEFAULT_LAYOUT
from ld_jax.digest import fingerprint, pairs_digest, params_digest
from ld_jax.losses import LossConfig
from ld_jax.train import sharding, writers
from ld_jax.train.optim import OptimizerConfig


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
    layout: str = DEFAULT_LAYOUT  # paired | shared_prefix (ld_jax.data.batch)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "smollm2-135m-instruct"  # a checkpoint directory or a known model name
    output_dir: str = "runs/dpo"
    batch_size: int = 32  # pairs per optimizer update (see train.feed.BatchLayout)
    strict_batch: bool = False  # error, instead of padding rows, when batch_size does not divide
    drop_last: bool = False  # drop each epoch's last incomplete batch instead of training on it
    num_epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": bf16 compute on float32 master weights
    param_dtype: str = "float32"  # stored weights and optimizer state ("bfloat16" halves them)
    remat: bool = False  # recompute each layer's activations in the backward pass
    offload_activations: bool = False  # with remat: the saved layer inputs wait in host memory
    unroll_layers: bool = False  # unrolled layer scan: faster steps on CPU, longer compile
    seq_chunk: int | None = None  # LM-head positions per chunk (bounds the logits' memory)
    # optimizer state in pinned host memory between steps, on the device only for the update
    offload_optimizer_state: bool = False
    reference: str = "cached"  # cached | on_the_fly
    # TR-DPO (Gorbatovski et al. 2024): every ref_sync_every steps the reference becomes
    # α·π_θ + (1 − α)·π_ref (soft update; α = 1 copies the policy). Needs reference=on_the_fly.
    ref_sync_every: int = 0
    ref_mixup_alpha: float = 0.6
    checkpoint_every: int = 0  # steps; 0 saves only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir
    force_resume: bool = False  # resume even from a checkpoint of another config, data or model
    final_eval: bool = True  # log-probs of the whole dataset after training (summary.json)
    progress: bool = True
    # where per-step metrics go besides metrics.jsonl (always written): tensorboard, wandb
    logging: tuple[str, ...] = ("jsonl",)
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
        if self.ref_sync_every and self.reference != "on_the_fly":
            raise ValueError("ref_sync_every (TR-DPO) needs reference='on_the_fly'")
        if not 0.0 < self.ref_mixup_alpha <= 1.0:
            raise ValueError(f"ref_mixup_alpha must be in (0, 1], got {self.ref_mixup_alpha}")
        unknown = set(self.logging) - set(writers.WRITERS)
        if unknown:
            raise ValueError(
                f"unknown logging {sorted(unknown)}; choose from {', '.join(writers.WRITERS)}"
            )


# TrainConfig fields that a resumed run may change: where and how long it runs and how it is
# logged, and options that trade speed or memory for the same numbers. Every other field is
# part of the run's identity, which every checkpoint stores.
RESUMABLE_CHANGES = (
    "output_dir",
    "num_epochs",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "force_resume",
    "final_eval",
    "progress",
    "logging",
    "remat",
    "offload_activations",
    "unroll_layers",
    "mesh",
    "strict_batch",
)


def model_options(cfg: TrainConfig) -> dict:
    """The ModelConfig run options that `cfg` sets (`LanguageModel.with_options(**...)`)."""
    return dict(
        dtype=cfg.compute_dtype,
        remat=cfg.remat,
        remat_offload=cfg.remat and cfg.offload_activations,
        unroll_layers=cfg.unroll_layers,
    )


def run_identity(cfg: TrainConfig, model, pairs, ref_logps=None) -> dict:
    """What a checkpoint must have been trained on to be resumed by `cfg`: every config field
    but RESUMABLE_CHANGES (dotted keys), the token ids, the initial weights and any given
    reference log-probs."""
    fields = {
        k: v for k, v in _flatten(to_dict(cfg)).items() if k.split(".")[0] not in RESUMABLE_CHANGES
    }
    fields["data_digest"] = pairs_digest(pairs)
    fields["weights_digest"] = params_digest(model.params, sample=64)
    if ref_logps is not None:
        fields["ref_logps_digest"] = fingerprint(np.asarray(ref_logps, np.float32).tobytes().hex())
    return json.loads(json.dumps(fields, default=str))  # as the checkpoint's JSON gives it back


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
