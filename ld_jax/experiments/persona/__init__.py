"""Experiment E1: catastrophic likelihood displacement with single-token responses (paper
Section 3, Table 1). `config` holds its settings, `run` the protocol, `step` the tracked jitted
step of one run, `report` the paper's tables and plots."""

from ld_jax.experiments.persona.config import DEFAULT_MEANINGS, PersonaConfig, SFTConfig
from ld_jax.experiments.persona.run import Run, run_persona

__all__ = ["DEFAULT_MEANINGS", "PersonaConfig", "Run", "SFTConfig", "run_persona"]
