"""One training step on 8 simulated CPU devices under several meshes equals the single-device
step (loss and updated parameters), for a tiny Llama and a tiny Gemma 3.

XLA's device count is fixed when jax starts, so the comparison runs in a child process
(`python tests/test_train_sharding.py <dir>`) with XLA_FLAGS set; the test reads its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
TOL = 1e-5


def test_sharded_step_equals_single_device(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))
    assert {(r["family"], tuple(r["mesh"]), r["micro_batches"]) for r in results} == {
        (f, m, 1) for f in ("llama", "gemma3") for m in MESHES
    } | {("llama", (2, 2, 2), 2)}
    for r in results:
        where = f"{r['family']} mesh {r['mesh']}"
        assert r["loss_diff"] <= TOL and r["param_diff"] <= TOL, (where, r)
        assert r["param_change"] > 10 * TOL, where  # the step moved the parameters
        assert r["wq_spec"] == r["expected_wq_spec"], where  # really sharded, not replicated


# ---- the child process --------------------------------------------------------------------------


def _child(root: Path) -> list[dict]:
    import jax
    import numpy as np
    from conftest import random_pairs, save_tiny_gemma3, save_tiny_llama

    from ld_jax import models
    from ld_jax.data import pipeline
    from ld_jax.losses import LossConfig
    from ld_jax.train import sharding
    from ld_jax.train.optim import OptimizerConfig, make_optimizer
    from ld_jax.train.state import init_state
    from ld_jax.train.step import compile_step

    assert jax.device_count() == 8, jax.devices()
    pairs = random_pairs(8, seed=4)
    batch = pipeline.make_batches(pairs, 8, shuffle=False, pad_to_multiple=8)[0]
    rng = np.random.default_rng(0)
    batch = batch.with_ref(-rng.uniform(10, 40, (8, 2)))  # a non-trivial margin
    optimizer = make_optimizer(OptimizerConfig(name="adamw", lr=1e-3, max_grad_norm=1.0))
    loss_cfg = LossConfig("dpo", beta=0.5)

    def one_step(lm, mesh, micro_batches=1):
        rules = sharding.rules_for(lm.config.family)
        params = sharding.put(lm.params, sharding.tree_shardings(lm.params, mesh, rules))
        state = init_state(params, optimizer)
        shardings = sharding.tree_shardings(state, mesh, rules)
        state = jax.device_put(state, shardings)
        step = compile_step(
            lm, loss_cfg, optimizer, mesh, shardings, batch, micro_batches=micro_batches
        )
        new, metrics = step(state, sharding.put(batch, sharding.batch_shardings(batch, mesh)))
        spec = new.params["layers"]["wq"].sharding.spec
        return jax.device_get(new.params), float(metrics["loss"]), list(spec)

    results = []
    lms = {
        "llama": models.from_pretrained(str(save_tiny_llama(root / "llama"))),
        "gemma3": models.from_pretrained(str(save_tiny_gemma3(root / "gemma3"))),
    }
    for family, lm in lms.items():
        single = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
        ref_params, ref_loss, _ = one_step(lm, single)
        change = max(
            float(np.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(lm.params))
        )
        cases = [(shape, 1) for shape in MESHES] + ([((2, 2, 2), 2)] if family == "llama" else [])
        for shape, micro_batches in cases:  # accumulated: 2 micro-batches of 4 rows, 1 per device
            mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
            params, loss, spec = one_step(lm, mesh, micro_batches)
            diff = max(
                float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))
            )
            expected = [None, "fsdp" if shape[1] > 1 else None, "tensor" if shape[2] > 1 else None]
            results.append(
                dict(
                    family=family,
                    mesh=list(shape),
                    micro_batches=micro_batches,
                    loss=loss,
                    loss_diff=abs(loss - ref_loss),
                    param_diff=diff,
                    param_change=change,
                    wq_spec=spec + [None] * (3 - len(spec)),
                    expected_wq_spec=expected,
                )
            )
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_child(Path(sys.argv[1]))))
