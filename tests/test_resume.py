"""Resuming a run: the guard against a changed config, data or model, and a real `ld-jax train`
process killed with SIGKILL while it writes a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from conftest import random_pairs, save_tiny_llama

from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig
from ld_jax.train import loop
from ld_jax.train.checkpoint import Checkpoints
from ld_jax.train.optim import OptimizerConfig

ROOT = Path(__file__).resolve().parents[1]
PAIRS = random_pairs(10, seed=7)


def _cfg(out, **kw):
    base = dict(
        output_dir=str(out),
        batch_size=4,
        num_epochs=1,
        seed=3,
        progress=False,
        checkpoint_every=1,
        final_eval=False,
        loss=LossConfig("dpo", beta=0.5),
        optimizer=OptimizerConfig(name="rmsprop", lr=3e-3),
    )
    return loop.TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(optimizer=OptimizerConfig(name="rmsprop", lr=1e-3)), "optimizer.lr"),
        (dict(loss=LossConfig("ipo", beta=0.5)), "loss.name"),
        (dict(seed=4), "seed"),
        ("data", "data_digest"),
        ("model", "weights_digest"),
    ],
)
def test_resume_refuses_a_changed_config_data_or_model_and_names_the_keys(
    tiny, tmp_path, change, named
):
    _, lm = tiny
    cfg = _cfg(tmp_path, max_steps=2)
    loop.train(cfg, model=lm, pairs=PAIRS)
    config_json = (tmp_path / "config.json").read_text()
    model, pairs, again = lm, PAIRS, dataclasses.replace(cfg, max_steps=3)
    if change == "data":
        pairs = random_pairs(10, seed=8)
    elif change == "model":
        model = dataclasses.replace(lm, params=jax.tree.map(lambda x: x + 0.01, lm.params))
    else:
        again = dataclasses.replace(again, **change)
    with pytest.raises(
        LdJaxError, match=rf"cannot resume in .*differs in .*{named}.*--force-resume"
    ):
        loop.train(again, model=model, pairs=pairs)
    assert (
        tmp_path / "config.json"
    ).read_text() == config_json  # the refused start changed nothing
    forced = loop.train(dataclasses.replace(again, force_resume=True), model=model, pairs=pairs)
    assert [r["step"] for r in forced.metrics] == [1, 2, 3]


def test_resume_allows_a_longer_run_and_speed_options(tiny, tmp_path):
    _, lm = tiny
    loop.train(_cfg(tmp_path, max_steps=1), model=lm, pairs=PAIRS)
    longer = loop.train(
        _cfg(tmp_path, max_steps=2, remat=True, checkpoint_every=2), model=lm, pairs=PAIRS
    )
    assert [r["step"] for r in longer.metrics] == [1, 2]


# A real `ld-jax train` (the CLI entry point) in its own process; XLA fixed at one CPU device.
def _start(config: Path, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "LD_JAX_"))}
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    argv = [
        sys.executable,
        "-m",
        "ld_jax.cli",
        "train",
        "--config",
        str(config),
        f"output_dir={out}",
    ]
    return subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]


def _writing(checkpoints: Path) -> bool:
    """An orbax checkpoint is being written: its temporary directory exists."""
    return checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir())


def _final_state(out: Path):
    ckpt = Checkpoints(out / "checkpoints")
    try:
        step = ckpt.latest_step()
        return step, ckpt._manager.restore(step).state  # raw restore: a tree of NumPy arrays
    finally:
        ckpt.close()


def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    model = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(0)
    text = lambda n: "".join(chr(c) for c in rng.integers(97, 123, rng.integers(3, n)))  # noqa: E731
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": text(12), "chosen": text(16), "rejected": text(16)}) + "\n"
            for _ in range(48)
        )
    )
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "batch_size": 4,
                "seed": 0,
                "progress": False,
                "checkpoint_every": 1,
                "final_eval": False,
                "data": {"source": str(data), "max_length": 64, "pad_to_multiple": 64},
                "loss": {"name": "dpo", "beta": 0.5},
                "optimizer": {"name": "adamw", "lr": 1e-3},
            }
        )
    )
    full = tmp_path / "full"
    _finish(_start(config, full))

    for attempt in range(5):  # the kill must land inside a checkpoint write; retry if it missed
        out = tmp_path / f"killed{attempt}"
        proc = _start(config, out)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "checkpoints" / "1").is_dir() and _writing(out / "checkpoints"):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and _writing(out / "checkpoints"):
            break
    else:
        pytest.fail("no SIGKILL landed inside a checkpoint write in 5 attempts")

    _finish(_start(config, out))  # resumes from the last complete checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # exactly one line per step
    (step_a, a), (step_b, b) = _final_state(full), _final_state(out)
    assert step_a == step_b == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_resume_keeps_one_metrics_line_per_step_after_torn_and_repeated_lines(tiny, tmp_path):
    """A kill can tear the last line, and a second writer can repeat one; the resumed run's
    metrics.jsonl must hold exactly one line per step."""
    _, lm = tiny
    loop.train(_cfg(tmp_path, max_steps=2), model=lm, pairs=PAIRS)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[1], lines[1], '{"step": 3, "lo']) + "\n")
    result = loop.train(_cfg(tmp_path), model=lm, pairs=PAIRS)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    assert [r["step"] for r in result.metrics] == [1, 2, 3]


def test_a_second_process_cannot_train_into_a_busy_run_directory(tiny, tmp_path):
    import fcntl

    _, lm = tiny
    with open(tmp_path / ".lock", "a+") as other:  # another process's training holds the directory
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LdJaxError, match="another process .* is training in"):
            loop.train(_cfg(tmp_path), model=lm, pairs=PAIRS)
    assert not (tmp_path / "metrics.jsonl").exists()
    loop.train(_cfg(tmp_path, max_steps=1), model=lm, pairs=PAIRS)  # free again
