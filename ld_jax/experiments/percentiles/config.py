"""The configuration of E2 (`ld-jax percentiles`): one frozen dataclass read from YAML, paper
values as defaults (SPEC §6 E2, paper Appendix J.2)."""

from __future__ import annotations

import dataclasses

from ld_jax import scoring
from ld_jax.losses import LossConfig
from ld_jax.train import loop, sharding
from ld_jax.train.optim import OptimizerConfig

MEASURES = scoring.SCORE_COLUMNS  # ches, ln_ches, edit_distance, last_hidden_ip


@dataclasses.dataclass(frozen=True)
class PercentilesConfig:
    """One `ld-jax percentiles` experiment (paper values as defaults, App. J.2).

    data: the loop's DataConfig; `data.max_length` bounds prompt + response tokens and longer
        responses are truncated (`overflow`, as in `ld-jax ches`); prompts over
        `data.max_prompt_length` are dropped. Pairs whose (truncated) replies are identical are
        left out: DPO's gradient on them is zero.
    batch_size: pairs per optimizer update, run as `optimizer.grad_accum_steps` micro-batches.
    lr_grid: if not empty, the lr is the largest of the grid for which every search run (seed 0
        of each window of `measures[0]`) finishes with a finite loss lower over its window than
        at the start; those runs are kept as results. Empty: `optimizer.lr` as given.
    reuse_freed_memory: as in PersonaConfig (host_memory.keep_freed_memory): faster steps for
        small models; turn it off for models whose step buffers fragment the single heap.
    """

    model: str = "smollm2-135m-instruct"
    title: str = ""  # model label in tables and plots; defaults to `model`
    data: loop.DataConfig = dataclasses.field(
        default_factory=lambda: loop.DataConfig(max_length=512)
    )
    overflow: str = "truncate"  # truncate | skip (see scoring)
    measures: tuple[str, ...] = ("ches", "edit_distance", "last_hidden_ip")
    percentiles: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    window: int = 512
    seeds: int = 3
    score_batch_size: int = 8
    batch_size: int = 32
    compute_dtype: str = "float32"
    remat: bool = False
    seq_chunk: int | None = None
    loss: LossConfig = dataclasses.field(default_factory=lambda: LossConfig("dpo", beta=0.1))
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig("rmsprop", lr=1e-7)
    )
    lr_grid: tuple[float, ...] = ()
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
    keep_checkpoints: bool = False  # keep each run's final orbax checkpoint (about 2x the params)
    samples_shown: int = 3  # highest and lowest CHES pairs in samples.md (paper Tables 14/15)
    out_dir: str = "results/percentiles"
    progress: bool = True
    reuse_freed_memory: bool = True

    def __post_init__(self):
        # YAML 1.1 reads 1e-7 as a string, and lists do not pass through the loader's float cast.
        object.__setattr__(self, "lr_grid", tuple(float(x) for x in self.lr_grid))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if bad := [m for m in self.measures if m not in MEASURES]:
            raise ValueError(f"unknown measure(s) {bad}; choose from {', '.join(MEASURES)}")
        if not self.measures or not self.percentiles:
            raise ValueError("need at least one measure and one percentile")
        if any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {self.percentiles}")
        if self.window < 1 or self.seeds < 1 or self.batch_size < 1:
            raise ValueError("window, seeds and batch_size must be >= 1")
        if self.overflow not in scoring.OVERFLOW:
            raise ValueError(f"overflow must be one of {scoring.OVERFLOW}, got {self.overflow!r}")
        if self.data.max_length is None:
            raise ValueError("data.max_length is required (the scores' length limit)")
