"""Flow verification throughput: instances verified per second, vmapped against a plain loop.

One "verification" of an instance integrates its gradient flow with diffrax (float64) and, at 8
points along it, compares every closed form of its setting with the autodiff rate
(`ld_jax.flow.verify`). Measured in one run, on the same random instances:

  (a) ld_jax: `verify.verify_batch`, the jitted function vmapped over all instances;
  (b) baseline: a Python loop calling the jitted single-instance `verify.verify_one` per instance.

Both are compiled first (compile times reported apart); the timed repeats alternate a and b so
that a shared machine's load falls on both alike. Writes benchmarks/results/flow.json with raw
timings; `ratio` is (a's instances/s) / (b's instances/s), higher is better.

    python benchmarks/flow.py [--instances 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from common import machine, write_result
from tqdm.auto import tqdm

from ld_jax.flow import state, verify

RESULTS = Path(__file__).parent / "results" / "flow.json"
HORIZON, N_SAVE = 0.3, 8


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_setting(name: str, instances: int, repeats: int, seed: int) -> dict:
    setting = verify.SETTINGS[name]
    params, problem = setting.sample(np.random.default_rng(seed), instances, len(setting.losses))
    one = [(state.take(params, i), state.take(problem, i)) for i in range(instances)]

    def vmapped():
        return verify.verify_batch(params, problem, setting, HORIZON, N_SAVE)

    def loop():
        return [verify.verify_one(p, pr, setting, HORIZON, N_SAVE) for p, pr in one]

    compile_vmapped = _timed(vmapped)
    compile_loop = _timed(lambda: verify.verify_one(*one[0], setting, HORIZON, N_SAVE))
    times = {"vmapped": [], "loop": []}
    for _ in tqdm(range(repeats), desc=name, unit="repeat"):
        times["vmapped"].append(_timed(vmapped))
        times["loop"].append(_timed(loop))
    return {
        "instances": instances,
        "compile_s": {"vmapped": compile_vmapped, "loop_first_instance": compile_loop},
        "seconds": times,
        "instances_per_s": {k: instances / float(np.median(v)) for k, v in times.items()},
        "ratio": float(np.median(times["loop"]) / np.median(times["vmapped"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="instances per setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with jax.enable_x64(True):
        settings = {
            name: bench_setting(name, args.instances, args.repeats, args.seed)
            for name in verify.SETTINGS
        }
    total = {
        k: sum(float(np.median(s["seconds"][k])) for s in settings.values())
        for k in ("vmapped", "loop")
    }
    n = args.instances * len(settings)
    result = {
        "benchmark": "flow verification throughput (integrate + closed forms vs autodiff at 8 points)",
        "ratio": total["loop"] / total["vmapped"],
        "instances_per_s": {
            "ld_jax_vmapped": n / total["vmapped"],
            "baseline_loop": n / total["loop"],
        },
        "settings": settings,
        "args": vars(args),
        "machine": machine(),
    }
    write_result(result, RESULTS)
    for name, s in settings.items():
        print(
            f"{name:>13}: vmapped {s['instances_per_s']['vmapped']:9.1f} inst/s, "
            f"loop {s['instances_per_s']['loop']:8.1f} inst/s, ratio {s['ratio']:.1f}"
        )
    print(
        f"all settings: ld_jax vmapped {result['instances_per_s']['ld_jax_vmapped']:.1f} inst/s vs "
        f"loop {result['instances_per_s']['baseline_loop']:.1f} inst/s; ratio {result['ratio']:.1f} -> {RESULTS}"
    )


if __name__ == "__main__":
    main()
