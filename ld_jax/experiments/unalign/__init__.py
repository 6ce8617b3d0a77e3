"""Experiment E3: unintentional unalignment from on-policy refusal data, and CHES filtering
against the SFT term (paper Section 6, Figure 3). `config` holds its settings, `onpolicy` the
prompts and preference pairs, `run` the protocol, `report` the tables and plots."""

from ld_jax.experiments.unalign.config import EvalConfig, UnalignConfig, WarmupConfig
from ld_jax.experiments.unalign.run import run_unalign

__all__ = ["EvalConfig", "UnalignConfig", "WarmupConfig", "run_unalign"]
