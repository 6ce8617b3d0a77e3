"""Multi-host execution and checkpoints across meshes, against independent single-process runs.

- `ld-jax train` and `ld-jax ches`, unchanged, on 2 processes x 4 simulated CPU devices joined
  by jax.distributed on localhost (gloo), give the losses, parameters and optimizer state of the
  same training on one process with 8 devices, and the CHES scores of single-process scoring.
- A checkpoint saved on an (8,1,1) mesh resumes in a 4-device process on a (2,2,1) mesh and
  reaches the parameters and optimizer state of an uninterrupted 8-device run.

XLA's device count is fixed when jax starts, so every training run is a child process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from conftest import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# One child: run CLI commands (JSON list of argv lists) in order; report the process layout.
CHILD = """
import json, sys
from ld_jax import cli
for argv in json.loads(sys.argv[1]):
    assert cli.main(argv) == 0, argv
import jax
print("LAYOUT", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    model = save_tiny_llama(root / "llama")
    rng = np.random.default_rng(0)
    text = lambda n: "".join(chr(c) for c in rng.integers(97, 123, rng.integers(3, n)))  # noqa: E731
    rows = [{"prompt": text(12), "chosen": text(16), "rejected": text(16)} for _ in range(32)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(model),
        "batch_size": 8,
        "seed": 0,
        "progress": False,
        "checkpoint_every": 0,
        # one padded length (64) for every batch: one compilation of each function per process
        "data": {
            "source": str(data),
            "max_prompt_length": 32,
            "max_length": 64,
            "pad_to_multiple": 64,
        },
        "loss": {"name": "dpo", "beta": 0.5},
        "optimizer": {"name": "adamw", "lr": 1e-3},  # large enough to move the tiny model visibly
    }
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    script = root / "child.py"
    script.write_text(CHILD)
    return dict(root=root, model=model, data=data, config=config, script=script)


def _run(setup, commands, devices: int, processes: int = 1, name: str = "run") -> list[str]:
    """Run `commands` in `processes` processes of `devices` CPU devices each -> their LAYOUT lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "LD_JAX_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "tests"))
    argv = [sys.executable, str(setup["script"]), json.dumps(commands)]
    if processes == 1:
        env.update(
            JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
        )
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-4000:]
        logs = [out.stdout]
    else:
        logs_dir = setup["root"] / f"logs_{name}"
        env["LOG_DIR"] = str(logs_dir)
        launcher = [
            "bash",
            str(ROOT / "launch/local_multiprocess.sh"),
            "-n",
            str(processes),
            "-d",
            str(devices),
        ]
        out = subprocess.run(
            [*launcher, "-p", str(_free_port()), "--", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        logs = [(logs_dir / f"proc{i}.log").read_text() for i in range(processes)]
        assert out.returncode == 0, out.stderr[-2000:] + "".join(log[-3000:] for log in logs)
    return [line for log in logs for line in log.splitlines() if line.startswith("LAYOUT")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(setup, out: Path, *overrides: str) -> list[str]:
    return ["train", "--config", str(setup["config"]), f"output_dir={out}", *overrides]


def _ches(setup, out: Path) -> list[str]:
    return [
        "ches",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["data"]),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--max-length",
        "64",
    ]


def _restore(directory: Path, step: int) -> dict:
    """The saved TrainState at `step` as NumPy arrays, read in this (1-device) process."""
    import orbax.checkpoint as ocp

    path = (directory / "checkpoints" / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckpt.restore(path, restore_args=args)


def _max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(leaves_a, leaves_b)
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


MESH8 = ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]


@pytest.fixture(scope="module")
def single(setup):
    """The single-process 8-device runs of both tests, in one child (one model load, shared
    compilations): `full` (3 steps on (8,1,1)) and `part` (its first 2 steps, to be resumed on
    another mesh)."""
    root = setup["root"]
    runs = dict(full=root / "full", part=root / "part")
    commands = [
        _train(setup, runs["full"], "max_steps=3", *MESH8),
        _train(setup, runs["part"], "max_steps=2", *MESH8),
    ]
    assert _run(setup, commands, devices=8) == ["LAYOUT 0 1 8"]
    return runs


def test_two_processes_match_one_process(setup, single):
    from ld_jax.scoring import ScoringConfig, score_file

    one, two = single["full"], setup["root"] / "two"  # `two` uses the default mesh: data = all 8
    # the second train resumes at step 3 (nothing left to run) and takes the reference log-probs
    # from the cache, which process 0 reads and broadcasts; its summary must not change
    train = _train(setup, two / "train", "max_steps=3")
    commands = [train, _ches(setup, two / "scores.jsonl"), train]
    assert sorted(_run(setup, commands, devices=4, processes=2, name="two")) == [
        "LAYOUT 0 2 8",
        "LAYOUT 1 2 8",
    ]
    # the single-process CHES reference runs here, in the test's own 1-device process
    score_file(
        ScoringConfig(
            str(setup["model"]), str(setup["data"]), str(one / "scores.jsonl"), max_length=64
        ),
        progress=False,
    )

    # training: the same per-step losses, final parameters and optimizer state
    losses_one, losses_two = _losses(one), _losses(two / "train")
    assert len(losses_one) == len(losses_two) == 3
    assert np.max(np.abs(np.subtract(losses_one, losses_two))) <= TOL, (losses_one, losses_two)
    state_one, state_two = _restore(one, 3), _restore(two / "train", 3)
    assert _max_diff(state_one, state_two) <= TOL
    init = _restore_init(setup)
    assert (
        _max_diff(state_one["params"]["layers"]["wq"], init["layers"]["wq"]) > 100 * TOL
    )  # it trained
    summary_one, summary_two = (
        json.loads((d / "summary.json").read_text()) for d in (one, two / "train")
    )
    assert abs(summary_one["loss_final"] - summary_two["loss_final"]) <= TOL
    assert len(list((two / "train").glob("ref_logps-*.npz"))) == 1
    refs = [np.load(next(d.glob("ref_logps-*.npz")))["logps"] for d in (one, two / "train")]
    assert np.max(np.abs(refs[0] - refs[1])) <= TOL * np.max(np.abs(refs[0]))

    # CHES: every pair scored once, the same scores
    scores = []
    for d in (one, two):
        rows = [json.loads(line) for line in (d / "scores.jsonl").read_text().splitlines()]
        scores.append({r["index"]: r for r in rows})
    assert sorted(scores[0]) == sorted(scores[1]) == list(range(32))
    for index, row in scores[0].items():
        for key in ("ches", "ln_ches", "last_hidden_ip", "edit_distance"):
            a, b = row[key], scores[1][index][key]
            assert abs(a - b) <= TOL * max(1.0, abs(a)), (index, key, a, b)


def _restore_init(setup) -> dict:
    from ld_jax import models

    return jax.device_get(models.from_pretrained(str(setup["model"])).params)


def test_checkpoint_resumes_on_another_mesh(setup, single):
    full, part = single["full"], single["part"]
    # mark the first run's metric lines: a resumed run keeps them, a fresh start would drop them
    lines = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    (part / "metrics.jsonl").write_text(
        "".join(json.dumps({**r, "first_run": True}) + "\n" for r in lines)
    )

    mesh4 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", "final_eval=false"]
    assert _run(setup, [_train(setup, part, "max_steps=3", *mesh4)], devices=4) == ["LAYOUT 0 1 4"]
    records = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("first_run", False)) for r in records] == [
        (1, True),
        (2, True),
        (3, False),
    ]
    assert np.max(np.abs(np.subtract(_losses(full), _losses(part)))) <= TOL
    state_full, state_part = _restore(full, 3), _restore(part, 3)
    assert int(state_part["step"]) == 3
    assert _max_diff(state_full, state_part) <= TOL
    assert (
        _max_diff(state_full["params"], _restore(part, 2)["params"]) > 100 * TOL
    )  # step 3 moved them
