"""Where a decode step's time goes: SmolLM2-135M-Instruct, fp32, one token per row.

Times, each the median of --repeats calls after a warm-up, on the same machine in one run:
  step       one whole decode step as `generate.sample`'s loop body runs it (the 30-layer scan
             with the KV cache of --slots slots, half full, the LM head), jitted; and again
             with twice the slots (what grows with the cache), and with the layer scan
             unrolled (`unroll_layers`: no per-layer slices of the stacked weights and cache);
  matmuls    only the 30 layers' seven weight matmuls on x [batch, 576] (a scan over the
             stacked weights), jitted;
  head       only the LM head x [batch, 576] @ embed.T, jitted;
  torch_*    the same two matmul sets in PyTorch (eager, the same threads);
  read       one pass over all weights (a jitted sum of every parameter): the bandwidth floor.
The step minus matmuls minus head is what the cache, attention, norms and RoPE cost.
Writes benchmarks/results/decode_profile.json.

    python benchmarks/decode_profile.py [--batch 8] [--slots 192] [--repeats 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import machine, write_result

from ld_jax import models

RESULTS = Path(__file__).parent / "results" / "decode_profile.json"
MATS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lm = models.from_pretrained("smollm2-135m-instruct")
    config, params, b = lm.config, lm.params, args.batch
    layers = params["layers"]

    def half_full_cache(slots):  # as in the middle of generation
        cache = models.init_cache(config, b, slots)
        prompt = jnp.ones((b, slots // 2), jnp.int32)
        return jax.jit(models.hidden_states_cached, static_argnums=0)(
            config, params, prompt, jnp.ones_like(prompt), cache
        )[1]

    cache, cache2 = half_full_cache(args.slots), half_full_cache(2 * args.slots)
    token, real = jnp.ones((b, 1), jnp.int32), jnp.ones((b, 1), jnp.int32)

    def make_step(config):
        @jax.jit
        def step(params, token, cache):
            hidden, cache = models.hidden_states_cached(config, params, token, real, cache)
            return models.logits_from_hidden(config, params, hidden[:, 0]), cache

        return step

    step = make_step(config)
    step_unrolled = make_step(config.replace(unroll_layers=True))

    @jax.jit
    def matmuls(layers, x):
        def body(x, w):  # the layer's seven products, kept alive by a tiny use of k and v
            q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
            h = (x @ w["w_gate"]) * (x @ w["w_up"])
            return x + q @ w["wo"] + h @ w["w_down"] + 1e-9 * (k.sum() + v.sum()), None

        return jax.lax.scan(body, x, {m: layers[m] for m in MATS})[0]

    head = jax.jit(lambda e, x: x @ e.T)
    read = jax.jit(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)))
    x = jnp.ones((b, config.d_model), jnp.float32) * 0.01

    t = {
        "step": median_s(lambda: jax.block_until_ready(step(params, token, cache)), args.repeats),
        "step_unrolled": median_s(
            lambda: jax.block_until_ready(step_unrolled(params, token, cache)), args.repeats
        ),
        "step_2x_slots": median_s(
            lambda: jax.block_until_ready(step(params, token, cache2)), args.repeats
        ),
        "matmuls": median_s(lambda: matmuls(layers, x).block_until_ready(), args.repeats),
        "head": median_s(lambda: head(params["embed"], x).block_until_ready(), args.repeats),
        "read": median_s(lambda: read(params).block_until_ready(), args.repeats),
    }
    tw = {m: torch.from_numpy(np.array(layers[m])) for m in MATS}
    te, tx = torch.from_numpy(np.array(params["embed"])), torch.from_numpy(np.asarray(x))

    @torch.no_grad()
    def torch_matmuls():
        h = tx
        for i in range(config.n_layers):
            w = {m: tw[m][i] for m in MATS}
            q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
            g = (h @ w["w_gate"]) * (h @ w["w_up"])
            h = h + q @ w["wo"] + g @ w["w_down"] + 1e-9 * (k.sum() + v.sum())
        return h

    t["torch_matmuls"] = median_s(torch_matmuls, args.repeats)
    t["torch_head"] = median_s(lambda: tx @ te.T, args.repeats)
    weight_bytes = sum(v.nbytes for v in jax.tree.leaves(params))
    flops = 2 * b * (sum(layers[m][0].size for m in MATS) * config.n_layers + te.numel())
    result = {
        "benchmark": "decode_profile",
        "batch": b,
        "cache_slots": args.slots,
        "kv_cache_bytes": int(cache.k.nbytes + cache.v.nbytes),
        "seconds": t,
        "rest_of_step_s": t["step"] - t["matmuls"] - t["head"],
        "weight_bytes": weight_bytes,
        "read_gb_per_s": weight_bytes / t["read"] / 1e9,
        "matmul_flops_per_step": flops,
        "gflops_per_s": {
            "matmuls+head": flops / (t["matmuls"] + t["head"]) / 1e9,
            "torch matmuls+head": flops / (t["torch_matmuls"] + t["torch_head"]) / 1e9,
        },
        "ratio": (t["torch_matmuls"] + t["torch_head"]) / (t["matmuls"] + t["head"]),
        "machine": machine(),
    }
    write_result(result, args.out)
    for k, v in t.items():
        print(f"{k:14} {1e3 * v:8.1f} ms")
    print(
        f"rest of step   {1e3 * result['rest_of_step_s']:8.1f} ms; read {result['read_gb_per_s']:.1f} GB/s"
    )


if __name__ == "__main__":
    main()
