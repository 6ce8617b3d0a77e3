"""Where a training run's per-step metrics go: `metrics.jsonl` always, TensorBoard and W&B when
the config's `logging` names them.

    writers = open_writers(("jsonl", "tensorboard"), out_dir, config=to_dict(cfg), start=k)
    writers.write(step, record)      # every writer gets the same scalars
    writers.close()

A writer is anything with `write(step, record)` and `close()`. TensorBoard event files are
written by `tensorboardX` (no TensorFlow; `pip install ld-jax[tensorboard]`) under
`<out>/tensorboard`; W&B (`pip install ld-jax[wandb]`) runs offline unless an API key is set,
because these machines have no network (`wandb sync <out>/wandb/...` uploads it later). A run
resumed at step k drops the events the interrupted run wrote after k, as metrics.jsonl does.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Protocol

import numpy as np

from ld_jax.errors import LdJaxError

WRITERS = ("jsonl", "tensorboard", "wandb")
# Quantiles of the per-pair ln π(y+|x) change logged every step.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class Writer(Protocol):
    def write(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


def displacement(change: np.ndarray) -> dict[str, float]:
    """Per-pair ln π(y+|x) − ln π_ref(y+|x) `[B]` (NaN on padding rows) -> its quantiles
    (`chosen_logp_change_q10`, ...) over the step's real pairs."""
    change = np.asarray(change, np.float64)
    change = change[np.isfinite(change)]
    if change.size == 0:
        return {}
    values = np.quantile(change, QUANTILES)
    return {f"chosen_logp_change_q{round(q * 100)}": float(v) for q, v in zip(QUANTILES, values)}


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric values but `step`: what the dashboards get."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class JsonlWriter:
    """One JSON line per step; the loop rewrites the file to the resumed step first."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, step: int, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardWriter:
    def __init__(self, directory: Path, start: int):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise LdJaxError(
                "logging 'tensorboard' needs tensorboardX: pip install 'ld-jax[tensorboard]'"
            ) from None
        # purge_step: TensorBoard hides the interrupted run's events from that step on.
        # tensorboardX names event files by the second; a resume within the same second would
        # reopen, and truncate, the first run's file, so each run's file names its start step.
        self._writer = SummaryWriter(
            str(directory),
            purge_step=start + 1 if start else None,
            filename_suffix=f".from{start}.{secrets.token_hex(3)}",
        )

    def write(self, step: int, record: dict) -> None:
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    def __init__(self, directory: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise LdJaxError("logging 'wandb' needs wandb: pip install 'ld-jax[wandb]'") from None
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "run_id"  # the same W&B run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ld-jax"),
            dir=str(directory),
            id=run_id,
            resume="allow",
            config=config,
        )

    def write(self, step: int, record: dict) -> None:
        self._run.log(scalars(record), step=step)

    def close(self) -> None:
        self._run.finish()


class Writers:
    """All of a run's writers as one; only the main process writes."""

    def __init__(self, writers: list[Writer]):
        self.writers = writers

    def write(self, step: int, record: dict) -> None:
        for w in self.writers:
            w.write(step, record)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def open_writers(names, out_dir, config: dict, start: int = 0, main: bool = True) -> Writers:
    """The writers `names` (a subset of WRITERS; jsonl is always among them) into `out_dir`,
    for a run that continues after step `start`."""
    unknown = set(names) - set(WRITERS)
    if unknown:
        raise LdJaxError(f"unknown logging {sorted(unknown)}; choose from {', '.join(WRITERS)}")
    if not main:
        return Writers([])
    out = Path(out_dir)
    writers: list[Writer] = [JsonlWriter(out / "metrics.jsonl")]
    if "tensorboard" in names:
        writers.append(TensorBoardWriter(out / "tensorboard", start))
    if "wandb" in names:
        writers.append(WandbWriter(out / "wandb", config))
    return Writers(writers)
