"""The configuration of `ld-jax predictors`: frozen dataclasses read from YAML. The protocol
(sizes, seeds, statistics) is fixed here before any outcome is looked at."""

from __future__ import annotations

import dataclasses

from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig

PREDICTORS = (
    "ches",
    "ln_ches",
    "edit_distance",
    "last_hidden_ip",
    "grad_cosine",  # ⟨g+, g−⟩ / (‖g+‖‖g−‖), Yuan et al. 2024's gradient entanglement
    "len_chosen",
    "len_rejected",
    "len_diff",  # |y+| − |y−|
    "pair_rate",  # the exact pair rate, as a predictor of the two other targets
)
TARGETS = ("pair_rate", "dataset_rate", "measured_change")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the benchmark.

    kind: "preference" (any file `data.preference.load_preferences` reads, formatted with
        `template` and cut to `max_length` tokens as `ld-jax ches` does) or "persona" (the
        Persona prompts under the chat template with single-token responses, the pairs of
        `persona_pairs` taken in turn).
    size: a random subset of this many usable pairs, drawn with `seed` before anything is
        scored (None: all of them). Pairs with identical responses are left out (DPO's
        gradient and the rate are both zero on them).
    """

    name: str
    source: str
    kind: str = "preference"
    size: int | None = None
    seed: int = 0
    limit: int | None = None  # records read from the file before the subset is drawn
    template: str = "auto"
    max_length: int = 128
    max_prompt_length: int = 96
    # skip, not truncate: truncating both responses to the same room would erase the length
    # differences that the length baselines and the partial correlations need
    overflow: str = "skip"
    persona_pairs: tuple[tuple[str, str], ...] = (("Yes", "No"), ("No", "Never"), ("Sure", "Yes"))

    def __post_init__(self):
        if self.kind not in ("preference", "persona"):
            raise ValueError(f"dataset kind must be preference or persona, got {self.kind!r}")
        object.__setattr__(self, "persona_pairs", tuple(tuple(p) for p in self.persona_pairs))


@dataclasses.dataclass(frozen=True)
class PredictorsConfig:
    """One `ld-jax predictors` run (issue #20's protocol).

    Targets: the pair-mode rate ⟨g+, g+ − g−⟩; the dataset-mode rate −⟨g+_i, ∇L⟩ (L the mean
    `loss` over the dataset's pairs); the change of ln π(y+|x) measured after one epoch of
    `loss` with `optimizer` through the training loop (`batch_size` pairs per update).
    Statistics, per dataset × predictor × target, each with a percentile-bootstrap 95%
    interval over samples (`bootstrap` resamples, `seed`): Spearman ρ, partial Spearman
    controlling for |y+| and |y−|, and AUROC of the predictor for "target < 0".
    """

    model: str = "smollm2-135m-instruct"
    title: str = ""
    datasets: tuple[DatasetConfig, ...] = ()
    score_batch_size: int = 8
    rate_batch_size: int = 2
    rate_layout: str = "paired"  # the fewer-FLOP pair-mode kernel (benchmarks/rate_throughput.py)
    loss: LossConfig = dataclasses.field(default_factory=lambda: LossConfig("dpo", beta=0.1))
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig("rmsprop", lr=1e-7)
    )
    batch_size: int = 8
    seed: int = 0
    seq_chunk: int | None = None
    bootstrap: int = 1000
    out_dir: str = "results/predictors"
    progress: bool = True
    only: tuple[str, ...] = ()  # run only these datasets (pieces under the lock); report all done

    def __post_init__(self):
        from ld_jax.config import from_dict

        datasets = tuple(
            d if isinstance(d, DatasetConfig) else from_dict(DatasetConfig, d, "datasets.")
            for d in self.datasets
        )
        object.__setattr__(self, "datasets", datasets)
        object.__setattr__(self, "only", tuple(self.only))
        if not datasets:
            raise ValueError("predictors needs at least one dataset")
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be distinct, got {names}")
        if bad := [n for n in self.only if n not in names]:
            raise ValueError(f"only names unknown datasets {bad}; have {names}")
