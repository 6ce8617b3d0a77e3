"""The configuration of E3 (`ld-jax unalign`): frozen dataclasses read from YAML, paper values
where the CPU allows (SPEC §6 E3, paper Appendix J.3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ld_jax import judge
from ld_jax.errors import LdJaxError
from ld_jax.experiments.unalign import onpolicy
from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that. If you have another question, I'm happy to help.",
    "I'm not able to help with this request.",
    "Sorry, but I can't provide that information.",
    "I apologize, but I can't assist with that.",
    "I won't help with that, because it could cause harm.",
    "I cannot help with this. Is there something else I can do for you?",
)


def refusal_texts(w: WarmupConfig) -> tuple[str, ...]:
    """The warm-up's refusal targets: `refusals_file`'s list when given, else `refusals`."""
    if w.refusals_file is None:
        return w.refusals
    path = Path(w.refusals_file)
    if not path.is_file():
        raise LdJaxError(f"warmup.refusals_file not found: {path}")
    return tuple(judge.string_list(yaml.safe_load(path.read_text()) or {}, "refusals", path))


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    """SFT on refusals for prompts disjoint from the experiment's, in rounds of
    `steps_per_round` steps, until the refusal rate on `eval_prompts` held-out warm-up prompts
    (at `temperature`, seed 0) reaches target[0] or `max_rounds` are done. The default
    temperature is that of the on-policy samples: a small model refuses far less at T = 1 than
    at T = 0.7, and the pairs are drawn at T = 1."""

    enabled: bool = True
    n_prompts: int = 256
    eval_prompts: int = 64
    refusals: tuple[str, ...] = REFUSALS
    # a YAML file with a `refusals:` list, used instead of `refusals` (for example
    # configs/warmup_refusals_varied.yaml: wordings free of the phrase judges' phrases)
    refusals_file: str | None = None
    lr: float = 1e-6
    batch_size: int = 16
    steps_per_round: int = 4
    max_rounds: int = 8
    target: tuple[float, float] = (0.6, 0.85)
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    temperature: float = 0.7
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 64
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class UnalignConfig:
    """One `ld-jax unalign` experiment; paper values where the CPU allows (App. J.3)."""

    model: str = "smollm2-135m-instruct"
    title: str = ""
    prompts: onpolicy.PromptsConfig = dataclasses.field(default_factory=onpolicy.PromptsConfig)
    n_prompts: int = 400
    template: str = "auto"
    seed: int = 0
    warmup: WarmupConfig = dataclasses.field(default_factory=WarmupConfig)
    temperature: float = 1.0  # on-policy samples
    max_new_tokens: int = 64
    sample_batch_size: int = 32
    judge: judge.JudgeConfig = dataclasses.field(default_factory=judge.JudgeConfig)
    reward_model: str | None = None  # local HF sequence classifier breaking ties; None: random
    test_fraction: float = 0.15
    # ches_equal_updates: the CHES subset again, for as many updates as the full data gets
    conditions: tuple[str, ...] = ("full", "sft", "gold", "ches", "ches_equal_updates")
    sft_lambdas: tuple[float, ...] = (0.01, 0.1, 1.0)
    # training runs per reported condition, with the loop seeds seed, seed + 1, ... (the order
    # of the pairs); the lr searches and the choice of λ use the first (`seed`'s) runs
    train_seeds: int = 1
    ches_fraction: float = 0.05
    loss: LossConfig = dataclasses.field(default_factory=lambda: LossConfig("dpo", beta=0.1))
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig("rmsprop", lr=1e-6)
    )
    lr_grid: tuple[float, ...] = ()  # largest lr whose `full` run lowers its loss (SPEC E3)
    batch_size: int = 32
    max_length: int = 256  # prompt + response tokens of a training pair (gold replies can be long)
    seq_chunk: int | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    cache_dir: str = "results/unalign_cache"  # warm-up, data and "before" rates; shared by DPO/IPO
    out_dir: str = "results/unalign"
    examples_shown: int = 5
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(
            self, "lr_grid", tuple(sorted((float(x) for x in self.lr_grid), reverse=True))
        )
        object.__setattr__(self, "sft_lambdas", tuple(float(x) for x in self.sft_lambdas))
        if self.train_seeds < 1:
            raise ValueError(f"train_seeds must be >= 1, got {self.train_seeds}")
        known = {"full", "sft", "gold", "ches", "ches_equal_updates"}
        if bad := set(self.conditions) - known:
            raise ValueError(
                f"unknown condition(s) {sorted(bad)}; choose from {', '.join(sorted(known))}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
