"""What every experiment shares, so that none of them writes its own: a keyed store of finished
runs that a restarted command resumes from, one learning-rate search, stage timing, one
logger, the machine record and cached stages.

    log = Log("percentiles", enabled=cfg.progress)
    stages = Stages(log)
    with stages("scores"):
        scores = cached_json(cache / f"scores-{key}.json", compute)
    store = RunStore(out / "runs" / key)
    recs = store.many([(run.name, lambda run=run: train(run)) for run in runs], "runs")
    lr, trials = lr_search(grid, train_at, "falls_overall", curve=lambda r: [r["loss_init"], r["loss_final"]])

Result files go through `ld_jax.files` (temporary file + rename), so a killed experiment never
leaves a truncated record that a restart would take as finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ld_jax import files
from ld_jax.train import loop


class Log:
    """Progress messages of one experiment, `[name] message`, or nothing when disabled."""

    def __init__(self, name: str, enabled: bool = True):
        self.name, self.enabled = name, enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.name}] {message}", flush=True)


class Stages:
    """Wall-clock seconds of named stages, in order: `with stages("scores"): ...`."""

    def __init__(self, log: Log):
        self.log, self.seconds = log, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.log(f"{name}: {self.seconds[name]:.1f} s")


def machine() -> dict:
    """Where an experiment ran: cores, platform, JAX version, backend and device count."""
    import jax

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def cached_json(path: str | Path, compute: Callable[[], dict]) -> dict:
    """A JSON-able stage result, computed once (`files.cached`; `path` names its key)."""
    return files.cached(
        path, compute, load=lambda p: json.loads(Path(p).read_text()), save=files.write_json
    )


def cached_arrays(
    path: str | Path, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """A dict of arrays, computed once and kept as .npz (`files.cached`)."""
    return files.cached(
        path, compute, load=files.load_npz, save=lambda p, v: files.save_npz(p, **v)
    )


class RunStore:
    """Finished runs of one protocol, one record per run name under `root` (whose name should
    be a fingerprint of everything the runs share): `<name>.json`, or `<name>.npz` for records of
    arrays. A run is finished when its record exists; a run's working files may live in the
    directory `workdir(name)`."""

    def __init__(self, root: str | Path, arrays: bool = False):
        self.root, self.arrays = Path(root), arrays

    def path(self, name: str) -> Path:
        return self.root / f"{name}.{'npz' if self.arrays else 'json'}"

    def workdir(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str) -> dict | None:
        path = self.path(name)
        if not path.is_file():
            return None
        return files.load_npz(path) if self.arrays else json.loads(path.read_text())

    def put(self, name: str, record: dict) -> dict:
        if self.arrays:
            files.save_npz(self.path(name), **record)
        else:
            files.write_json(self.path(name), record)
        return record

    def run(self, name: str, compute: Callable[[], dict | None]) -> dict | None:
        """The stored record of `name`, or `compute()` stored (a None result is not stored)."""
        record = self.get(name)
        if record is None and (record := compute()) is not None:
            self.put(name, record)
        return record

    def many(
        self,
        runs: Sequence[tuple[str, Callable[[], dict | None]]],
        desc: str,
        progress: bool = True,
    ) -> list[dict] | None:
        """Records of every (name, compute) in order, with a progress bar that starts at the
        finished ones. A compute that returns None stops the batch: the result is None."""
        done = sum(self.path(name).is_file() for name, _ in runs)
        bar = tqdm(total=len(runs), initial=done, desc=desc, unit="run", disable=not progress)
        records = []
        for name, compute in runs:
            fresh = not self.path(name).is_file()
            record = self.run(name, compute)
            if record is None:
                bar.close()
                return None
            records.append(record)
            if fresh:
                bar.update(1)
                bar.set_postfix(last=name)
        bar.close()
        return records


# A stability rule judges a run by its loss curve `[points]` (at least the first and last value).
STABILITY_RULES: dict[str, Callable[[np.ndarray], bool]] = {
    # E1 (paper J.1): the loss fell strictly at every step
    "falls_every_step": lambda loss: bool(np.all(np.isfinite(loss)) and np.all(np.diff(loss) < 0)),
    # E2 and E3 (SPEC E3: "the largest stable lr"): finite, and lower at the end than at the start
    "falls_overall": lambda loss: bool(np.all(np.isfinite(loss)) and loss[-1] < loss[0]),
}


def lr_search(
    grid: Sequence[float],
    train_at: Callable[[float], list[dict] | None],
    rule: str,
    curve: Callable[[dict], Sequence[float]],
) -> tuple[float | None, list[tuple[float, list | None, bool]]]:
    """The largest lr of `grid` whose runs (`train_at(lr)`; None: aborted, so unstable) all pass
    the stability `rule` on their loss `curve(record)`.

    Returns (that lr, or None when none passes; the trials [(lr, records, stable)] in the order
    tried, largest first). Each experiment turns the trials into its own log."""
    check = STABILITY_RULES[rule]
    trials = []
    for lr in sorted(grid, reverse=True):
        records = train_at(lr)
        stable = records is not None and all(
            check(np.asarray(curve(r), np.float64)) for r in records
        )
        trials.append((lr, records, stable))
        if stable:
            return lr, trials
    return None, trials


def train_config(cfg, output_dir: Path, lr: float, **kw) -> loop.TrainConfig:
    """The loop's config for one training run of an experiment: one epoch (unless `kw` sets
    num_epochs) at `lr` with the
    experiment's model, batch size, seq_chunk, optimizer and progress setting, one checkpoint
    kept; `kw` sets the rest (seed, loss, data, ...). `cfg` is the experiment's config."""
    fields = dict(
        model=cfg.model,
        output_dir=str(output_dir),
        batch_size=cfg.batch_size,
        num_epochs=1,
        seq_chunk=cfg.seq_chunk,
        optimizer=dataclasses.replace(cfg.optimizer, lr=lr),
        keep_checkpoints=1,
        progress=cfg.progress,
    )
    return loop.TrainConfig(**{**fields, **kw})
