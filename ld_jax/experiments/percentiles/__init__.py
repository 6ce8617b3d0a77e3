"""Experiment E2: CHES identifies the samples that cause likelihood displacement (paper Section
5, Figure 2). `config` holds its settings, `run` the protocol, `report` the tables and plots."""

from ld_jax.experiments.percentiles.config import MEASURES, PercentilesConfig
from ld_jax.experiments.percentiles.run import Run, run_percentiles

__all__ = ["MEASURES", "PercentilesConfig", "Run", "run_percentiles"]
