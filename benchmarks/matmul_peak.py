"""How fast this CPU multiplies float32 matrices, under XLA (ld_jax's backend) and PyTorch (TRL's
and the CHES reference's backend), on the shapes of the SmolLM2-135M DPO step and on one large
square product (the machine's practical peak).

The DPO step and the CHES forward are almost all matmuls (docs/performance.md), so these rates
bound what any implementation of them can reach here: a step of F FLOPs cannot take less than
F / (best matmul rate) seconds. `bounds` turns that into the best ratio to TRL that
`benchmarks/dpo_step.py` could report, from the TRL step time in benchmarks/results/dpo_step.json.

Sides alternate call by call (benchmarks/common.interleaved_times). Run it on an idle machine:

    python benchmarks/matmul_peak.py [--repeats 5]

Writes benchmarks/results/matmul_peak.json; `ratio` is XLA's rate over PyTorch's on the step's
FLOP mix (higher is better for ld_jax).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from common import interleaved_times, machine

RESULTS = Path(__file__).parent / "results" / "matmul_peak.json"
ROWS = 4 * 2 * 256  # the DPO benchmark's batch: 4 pairs, chosen + rejected, 256 tokens
D, FF, Q, KV, VOCAB, LAYERS = 576, 1536, 576, 192, 49152, 30  # SmolLM2-135M
# (name, m, k, n, times per step's forward): the fused projections ld_jax uses, and the LM head.
SHAPES = [
    ("qkv", ROWS, D, Q + 2 * KV, LAYERS),
    ("attn_out", ROWS, Q, D, LAYERS),
    ("gate_up", ROWS, D, 2 * FF, LAYERS),
    ("down", ROWS, FF, D, LAYERS),
    ("lm_head", ROWS, D, VOCAB, 1),
    ("square_2048", 2048, 2048, 2048, 0),  # not in the step: the machine's practical peak
]


def sides(m: int, k: int, n: int) -> dict:
    """The forward product x @ w and the backward ones (dy @ w.T, x.T @ dy), per framework."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in [(m, k), (k, n), (m, n)])
    jx, jw, jdy = map(jnp.asarray, (x, w, dy))
    tx, tw, tdy = map(torch.from_numpy, (x, w, dy))
    three = jax.jit(lambda x, w, dy: (x @ w, dy @ w.T, x.T @ dy))

    def xla():
        jax.block_until_ready(three(jx, jw, jdy))

    def pytorch():
        with torch.no_grad():
            tx @ tw, tdy @ tw.T, tx.T @ tdy

    return {"xla": xla, "torch": pytorch}


def bounds(result: dict) -> dict:
    """Step FLOPs (matmuls only: forward + 2 backward products) and the fastest the step could
    go at each framework's measured rates, against the committed TRL step time."""
    flops = sum(3 * 2 * m * k * n * times for _, m, k, n, times in SHAPES)
    secs = {
        side: sum(
            3 * 2 * m * k * n * times / (result["shapes"][name][side]["gflops"] * 1e9)
            for name, m, k, n, times in SHAPES
            if times
        )
        for side in ("xla", "torch")
    }
    out = {"step_matmul_tflop": flops / 1e12, "step_matmul_s": secs}
    dpo = Path(__file__).parent / "results" / "dpo_step.json"
    if dpo.is_file():
        trl_s = json.loads(dpo.read_text())["trl_dpo_trainer"]["median_step_s"]
        peak = result["shapes"]["square_2048"]
        best = max(peak["xla"]["gflops"], peak["torch"]["gflops"])
        out |= {
            "trl_step_s": trl_s,
            "trl_gflops": flops / trl_s / 1e9,
            "best_ratio_to_trl_at_xla_step_rates": trl_s / secs["xla"],
            "best_ratio_to_trl_at_peak_rate": trl_s / (flops / (best * 1e9)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    result = {
        "benchmark": "float32 matmul rates, XLA vs PyTorch, CPU",
        "machine": machine(),
        "shapes": {},
    }
    for name, m, k, n, times in SHAPES:
        _, ts = interleaved_times(sides(m, k, n), warmup=1, repeats=args.repeats, desc=name)
        flop = 3 * 2 * m * k * n
        result["shapes"][name] = {"m": m, "k": k, "n": n, "per_step": times} | {
            side: {
                "times_s": t,
                "median_s": statistics.median(t),
                "gflops": flop / statistics.median(t) / 1e9,
            }
            for side, t in ts.items()
        }
    result["bounds"] = bounds(result)
    secs = result["bounds"]["step_matmul_s"]
    rate = {
        side: result["bounds"]["step_matmul_tflop"] * 1e3 / s for side, s in secs.items()
    }  # GFLOP/s
    result["step_mix_gflops"] = rate
    result["ratio"] = rate["xla"] / rate["torch"]
    result["machine"]["load_average_after"] = machine()["load_average"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, *_ in SHAPES:
        r = result["shapes"][name]
        print(
            f"{name:12s} XLA {r['xla']['gflops']:6.1f} GFLOP/s   torch {r['torch']['gflops']:6.1f} GFLOP/s"
        )
    print(
        f"step mix: XLA {rate['xla']:.1f}, torch {rate['torch']:.1f} GFLOP/s, ratio {result['ratio']:.2f}"
    )
    print(json.dumps(result["bounds"], indent=2))


if __name__ == "__main__":
    main()
