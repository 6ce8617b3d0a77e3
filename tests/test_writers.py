"""Metric writers: a training run's TensorBoard event file, read back by tensorboard's own event
reader, holds the scalars of metrics.jsonl; the displacement metrics equal a direct computation
of the per-pair ln π(y+) change; W&B writes an offline run when no key is set."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import random_pairs
from test_train import _batch, _one_step

from ld_jax import logprobs
from ld_jax.losses import LossConfig
from ld_jax.train import loop, writers
from ld_jax.train.optim import OptimizerConfig

PAIRS = random_pairs(10, seed=7)


def _cfg(out, **kw):
    base = dict(
        output_dir=str(out),
        batch_size=4,
        num_epochs=1,
        seed=3,
        progress=False,
        final_eval=False,
        loss=LossConfig("dpo", beta=0.5),
        optimizer=OptimizerConfig(name="rmsprop", lr=3e-3),
    )
    return loop.TrainConfig(**{**base, **kw})


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_the_metrics_jsonl_scalars(tiny, tmp_path):
    pytest.importorskip("tensorboardX")
    _, lm = tiny
    loop.train(_cfg(tmp_path, logging=("jsonl", "tensorboard")), model=lm, pairs=PAIRS)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    events = _tensorboard_scalars(tmp_path / "tensorboard")
    expected = {k for k in lines[0] if k != "step"}
    assert set(events) == expected
    assert {"fraction_chosen_fell", "chosen_logp_change_q50", "chosen_logp_change_q90"} <= expected
    for name, points in events.items():
        assert [s for s, _ in points] == [r["step"] for r in lines], name
        # event files hold float32
        np.testing.assert_allclose([v for _, v in points], [r[name] for r in lines], rtol=1e-6)


def test_a_resumed_run_purges_the_events_after_its_checkpoint(tiny, tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    from tensorboardX import event_file_writer

    # a fast machine resumes within the second that names the first run's event file
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
    _, lm = tiny
    cfg = _cfg(tmp_path, logging=("tensorboard",), checkpoint_every=1, num_epochs=2)
    loop.train(dataclasses.replace(cfg, max_steps=4), model=lm, pairs=PAIRS)
    (tmp_path / "checkpoints" / "4").rename(tmp_path / "checkpoints" / "old4")  # "killed" at 3
    loop.train(cfg, model=lm, pairs=PAIRS)
    loss = _tensorboard_scalars(tmp_path / "tensorboard")["loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in loss] == list(range(1, 7)) == [r["step"] for r in lines]
    np.testing.assert_allclose([v for _, v in loss], [r["loss"] for r in lines], rtol=1e-6)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_displacement_metrics_equal_a_direct_computation(tiny, micro_batches):
    _, lm = tiny
    batch = _batch(n=5, batch_size=8)  # 3 padding rows must not count
    _, metrics = _one_step(
        lm, batch, OptimizerConfig(name="sgd", lr=1.0), micro_batches=micro_batches
    )
    logps = np.asarray(jax.jit(lambda p, b: logprobs.pair_logprobs(lm, p, b)[0])(lm.params, batch))
    change = (logps - batch.ref_logps)[:5, 0].astype(np.float64)
    assert metrics["fraction_chosen_fell"] == pytest.approx((change < 0).mean(), abs=1e-6)
    quantiles = writers.displacement(metrics["pair_chosen_logp_change"])
    for q in writers.QUANTILES:
        assert quantiles[f"chosen_logp_change_q{round(q * 100)}"] == pytest.approx(
            np.quantile(change, q), abs=1e-4
        )


def test_unknown_logging_is_refused():
    with pytest.raises(ValueError, match="unknown logging"):
        _cfg("x", logging=("jsonl", "mlflow"))


WANDB_SCRIPT = """
import sys, json
sys.path.insert(0, sys.argv[2])
from ld_jax.train import writers
w = writers.open_writers(("wandb",), sys.argv[1], config={"lr": 1.0})
w.write(1, {"step": 1, "loss": 0.5})
w.write(2, {"step": 2, "loss": 0.25})
w.close()
"""


def test_wandb_runs_offline_without_a_key(tmp_path):
    """In a subprocess: wandb.init changes process-wide state."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb not installed (pip install 'ld-jax[wandb]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-c", WANDB_SCRIPT, str(tmp_path), root], env=env, check=True, timeout=300
    )
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
