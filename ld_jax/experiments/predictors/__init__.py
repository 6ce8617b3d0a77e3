"""`ld-jax predictors`: displacement predictors benchmarked against the exact first-order rates
(issue #20). `run_predictors(PredictorsConfig(...))`."""

from ld_jax.experiments.predictors.config import DatasetConfig, PredictorsConfig
from ld_jax.experiments.predictors.run import run_predictors

__all__ = ["DatasetConfig", "PredictorsConfig", "run_predictors"]
