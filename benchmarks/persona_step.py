"""Benchmark of one Persona (E1) training step on SmolLM2-135M-Instruct: DPO on one chat-formatted
prompt, y+/y− read from the last position, RMSProp on every parameter, tracking included.

Measured in one run:
- ours: the jitted, donated step of `ld_jax.experiments.persona.step` that the experiment uses
  (runs executed one after another);
- vmapped: the same step vmapped over R runs stacked on a leading axis (the alternative we
  rejected), per run-step;
- baseline: transformers' PyTorch model with torch.optim.RMSprop, the same loss and prompt.

    python benchmarks/persona_step.py [--steps 5] [--runs 3]

Writes benchmarks/results/persona_step.json; `ratio` = baseline seconds / ours (higher is better).
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

from ld_jax import host_memory, models
from ld_jax.experiments.persona import run as persona_run
from ld_jax.experiments.persona import step as persona_step
from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig

MODEL = "smollm2-135m-instruct"
DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "persona" / "ends-justify-means.jsonl"
)


def timed(fn, steps: int) -> dict:
    """Wall and process-CPU seconds of each call after one warm-up (compile) call."""
    t = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - t
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "first_call_s": compile_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": float(np.median(wall)),
    }


def batch_for(lm, ids: list[int], y_pos: int, y_neg: int) -> dict:
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids)
    logp0, _ = jax.jit(
        lambda p: persona_step.last_position_logprobs(lm, p, ids, mask, len(ids) - 1)
    )(lm.params)
    return {
        "ids": ids,
        "mask": mask,
        "last": np.int32(len(ids) - 1),
        "y_pos": y_pos,
        "y_neg": y_neg,
        "ref_pos": logp0[y_pos],
        "ref_neg": logp0[y_neg],
        "p0": jnp.exp(logp0),
        "watch": np.array([y_pos, y_neg], np.int32),
        "lr": np.float32(1e-6),
    }


def bench_ours(lm, batch, steps):
    opt, step, _, _ = persona_step.make_run_fns(
        lm, LossConfig(), OptimizerConfig(lr=1.0), track_k=10
    )
    state = {"params": jax.tree.map(jnp.copy, lm.params)}
    state["opt"] = opt.init(state["params"])

    def call():
        state["params"], state["opt"], m = step(state["params"], state["opt"], batch)
        jax.block_until_ready(m)

    return timed(call, steps)


def bench_vmapped(lm, batch, steps, runs):
    opt, step, _, _ = persona_step.make_run_fns(
        lm, LossConfig(), OptimizerConfig(lr=1.0), track_k=10
    )
    vstep = jax.jit(jax.vmap(step.__wrapped__), donate_argnums=(0, 1))
    params = jax.tree.map(lambda x: jnp.tile(x[None], (runs,) + (1,) * x.ndim), lm.params)
    state = {"params": params, "opt": jax.vmap(opt.init)(params)}
    stacked = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * runs), batch)

    def call():
        state["params"], state["opt"], m = vstep(state["params"], state["opt"], stacked)
        jax.block_until_ready(m)

    result = timed(call, steps)
    result["per_run_median_wall_s"] = result["median_wall_s"] / runs
    return result


def bench_torch(ids: list[int], y_pos: int, y_neg: int, steps: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(models.loading.resolve(MODEL)), dtype=torch.float32
    )
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-6)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(x).logits[0, -1], -1)[[y_pos, y_neg]]

    def call():
        hidden = model.model(input_ids=x).last_hidden_state[0, -1]
        logp = torch.log_softmax(model.lm_head(hidden), -1)
        margin = (logp[y_pos] - ref[0]) - (logp[y_neg] - ref[1])
        loss = torch.nn.functional.softplus(-0.1 * margin)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(call, steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    host_memory.keep_freed_memory()  # as `ld-jax persona` does; the PyTorch baseline shares it
    lm = models.from_pretrained(MODEL)
    question = persona_run.load_records(DATA)[0]["question"]
    (ids,), _ = persona_run.encode_prompts(lm.tokenizer, [question], "chat")
    y_pos, y_neg = (lm.tokenizer.convert_tokens_to_ids(w) for w in ("No", "Never"))
    batch = batch_for(lm, ids, y_pos, y_neg)

    results = {"ours": bench_ours(lm, batch, args.steps)}
    print(f"ours (plain jitted step):  {results['ours']['median_wall_s']:.2f} s/step")
    results["vmapped"] = bench_vmapped(lm, batch, args.steps, args.runs)
    print(
        f"vmapped over {args.runs} runs:       {results['vmapped']['per_run_median_wall_s']:.2f} s/run-step"
    )
    results["baseline_torch"] = bench_torch(ids, y_pos, y_neg, args.steps)
    print(f"PyTorch + transformers:    {results['baseline_torch']['median_wall_s']:.2f} s/step")

    ratio = results["baseline_torch"]["median_wall_s"] / results["ours"]["median_wall_s"]
    vmap_ratio = results["vmapped"]["per_run_median_wall_s"] / results["ours"]["median_wall_s"]
    print(f"ratio (PyTorch / ours): {ratio:.2f}x; vmapped / plain per run-step: {vmap_ratio:.2f}")
    out = {
        "benchmark": "persona_step",
        "model": MODEL,
        "prompt_tokens": len(ids),
        "steps": args.steps,
        "ratio": ratio,
        "vmapped_over_plain_per_run_step": vmap_ratio,
        **results,
        "machine": machine(),
    }
    path = Path(__file__).parent / "results" / "persona_step.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, path)
    print(path)


if __name__ == "__main__":
    main()
