"""The configuration of E1 (`ld-jax persona`): one frozen dataclass read from YAML, paper values
as defaults (SPEC §6 E1, paper Appendix J.1)."""

from __future__ import annotations

import dataclasses

from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig

DEFAULT_MEANINGS = {
    "yes": (
        "Yes",
        "Yeah",
        "Yep",
        "Yup",
        "Sure",
        "Certainly",
        "Absolutely",
        "Definitely",
        "Indeed",
        "Agreed",
        "Agree",
        "Correct",
        "True",
        "Right",
        "Of course",
        "Okay",
        "OK",
    ),
    "no": ("No", "Never", "Nope", "Nah", "Not", "None", "False", "Disagree", "Incorrect", "Wrong"),
    "hedge": (
        "Maybe",
        "Perhaps",
        "Possibly",
        "Probably",
        "Sometimes",
        "Depends",
        "Unsure",
        "Uncertain",
        "Partially",
        "Somewhat",
    ),
}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The optional SFT phase: CE on a random label from the prompt's set (`persona.sft`).

    rule "set_mass" (this project's, fixed before any DPO run was looked at): hold out `heldout`
    prompts; for each lr of `lr_grid` in ascending order train for up to `epochs` epochs,
    measuring the held-out prompts' mean set mass every `eval_every` steps; the first (lr, step)
    reaching `target_mass` is the phase. rule "fixed": `epochs` epochs over all prompts at `lr`
    (the paper's J.1 recipe, lr 1e-7, one epoch; the earlier protocol).
    """

    enabled: bool = False
    rule: str = "set_mass"  # set_mass | fixed
    lr: float = 1e-7
    lr_grid: tuple[float, ...] = (1e-6, 3e-6, 1e-5)
    target_mass: float = 0.9
    heldout: int = 100
    eval_every: int = 4
    batch_size: int = 32
    epochs: int = 1
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lr_grid", tuple(float(x) for x in self.lr_grid))
        if self.rule not in ("set_mass", "fixed"):
            raise ValueError(f"sft.rule must be set_mass or fixed, not {self.rule!r}")
        if self.rule == "set_mass" and (
            not self.lr_grid or list(self.lr_grid) != sorted(self.lr_grid)
        ):
            raise ValueError(f"sft.lr_grid must be non-empty and ascending, got {self.lr_grid}")
        if self.eval_every < 1 or self.epochs < 1 or self.heldout < 0:
            raise ValueError("sft.eval_every and sft.epochs must be >= 1, sft.heldout >= 0")


@dataclasses.dataclass(frozen=True)
class PersonaConfig:
    """Everything one `ld-jax persona` run needs. Paper values as defaults.

    lr_grid: candidate lrs, largest chosen whose search runs all fall at every step; empty means
        use `optimizer.lr` as is. lr_search_seeds: seeds per pair in that search.
    substitutes: set word -> the single-token text used in its place (e.g. "Absolutely" ->
        " Absolutely" where the bare word is two tokens). Any other multi-token word is an error.
    meanings: meaning -> words; gainers are benign when their meaning equals y+'s, catastrophic
        when it differs, unclassified when unknown. Lower-case and leading-space variants match.
    reuse_freed_memory: keep glibc from unmapping freed blocks (host_memory.keep_freed_memory),
        which saves SmolLM2 a fifth of its step time. Off for Gemma-3-270m: its 0.7 GB
        embedding-sized buffers fragment the single heap until the process is OOM-killed (RSS
        from 8 to 24 GB within one run, twice).
    """

    model: str = "smollm2-135m-instruct"
    data: str = "../shared/data/persona/ends-justify-means.jsonl"
    prompt_format: str = "auto"  # auto | chat | plain (question + "\n")
    pairs: tuple[tuple[str, str], ...] = (("Yes", "No"), ("No", "Never"), ("Sure", "Yes"))
    seeds: int = 10
    prompt_seed: int = 0
    steps: int = 100
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-7)
    lr_grid: tuple[float, ...] = ()
    lr_search_seeds: int = 3
    sft: SFTConfig = SFTConfig()
    no_set: tuple[str, ...] = ("No", "Never", "Maybe", "Perhaps")
    yes_set: tuple[str, ...] = ("Yes", "Yeah", "Sure", "Certainly", "Absolutely")
    substitutes: dict = dataclasses.field(default_factory=dict)
    meanings: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_MEANINGS))
    top_k: int = 3
    track_k: int = 10
    report_steps: tuple[int, ...] = (5, 25, 100)
    out_dir: str = "results/persona"
    title: str = ""  # model label in the tables; defaults to `model`
    reuse_freed_memory: bool = True

    def token_words(self) -> list[str]:
        """The words a run resolves to single tokens: the pairs' and both sets' (whose masses
        every run reports)."""
        return list(
            dict.fromkeys([w for pair in self.pairs for w in pair] + [*self.no_set, *self.yes_set])
        )

    def __post_init__(self):
        # YAML 1.1 reads 1e-7 as a string; lists of lrs do not pass through the loader's float cast.
        object.__setattr__(self, "lr_grid", tuple(float(x) for x in self.lr_grid))
        words = [*self.token_words(), *self.substitutes]
        words += [w for ws in self.meanings.values() for w in ws]
        if bad := [w for w in words if not isinstance(w, str)]:
            raise ValueError(
                f"token words must be strings, got {bad}: quote Yes/No in YAML, which reads them as booleans"
            )
        if any(len(pair) != 2 for pair in self.pairs):
            raise ValueError(f"each pair must be [y+, y-], got {self.pairs}")
        if self.prompt_format not in ("auto", "chat", "plain"):
            raise ValueError(
                f"prompt_format must be auto, chat or plain, not {self.prompt_format!r}"
            )
        if self.seeds < 1 or self.steps < 1:
            raise ValueError("seeds and steps must be >= 1")
        if any(s > self.steps for s in self.report_steps):
            raise ValueError(f"report_steps {self.report_steps} go beyond steps={self.steps}")
        if self.top_k > self.track_k:
            raise ValueError("top_k must be <= track_k")
