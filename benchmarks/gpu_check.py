"""GPU checks on one lent accelerator, in one call: real step memory against the compiled
numbers, step throughput per layout, the fused attention against the plain one, and CHES
throughput against the paper's per-sample PyTorch loop on the same GPU.

Each part runs in a fresh process (so each one's `peak_bytes_in_use` is its own) with its own
time limit, and the merged record goes to `$OUT/gpu_check.json` (else
`benchmarks/results/gpu_check.json`). No weights travel to the GPU machine: every model is
random, drawn from the architecture (throughput and memory do not depend on the values), and
the CHES pairs are UltraFeedback pairs tokenized here by SmolLM2's tokenizer (`--pairs`, a JSON
list of TokenizedPair fields; `.gpu/pairs.json` is made by this module's `--make-pairs`).

    python benchmarks/gpu_check.py [--budget-s 420] [--parts step_paired,step_shared,...]

Parts:
  step_<layout>  `configs/paper/dpo_gemma2b_h100x8.yaml` on one GPU (mesh 1,1,1; the paper's
                 32 pairs, 256-token prompts, replies filling max_length 512 -- the batch of
                 docs/scaling.md's prefix-sharing table): the GPU compiler's memory_analysis,
                 the allocator's peak during the steps, step time, tokens/s.
  llama8b        Llama-3-8B's h100x8 config at its per-device share (4 pairs), paired: the
                 same memory comparison at 8B.
  attention      SmolLM2-135M (random, fp32, matmul precision "highest"): chosen/rejected
                 log-probs with attention "auto" (jax.nn.dot_product_attention on the GPU)
                 against "plain", on packed shared-prefix rows.
  ches           SmolLM2-135M (random, fp32, "highest"): `ches.score_batches` at batch 8 and
                 64 against the per-sample transformers loop on CUDA, with the scores compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # common, ches_throughput
PAIRS = ROOT / ".gpu" / "pairs.json"
SMOLLM2 = ROOT / ".gpu" / "smollm2"  # its config.json (the architecture only)
GEMMA = ROOT / "configs" / "paper" / "dpo_gemma2b_h100x8.yaml"
LLAMA = ROOT / "configs" / "paper" / "dpo_llama3_8b_h100x8.yaml"
COMPILED = ROOT / "benchmarks" / "results" / "compile"


def random_params(abstract, seed=0):
    """Normal(0, 0.02) weights, ones for norms, in each leaf's dtype, made on the device."""
    import jax
    import jax.numpy as jnp

    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.key(seed), len(paths))
    leaves = []
    for k, (path, leaf) in zip(keys, paths):
        if "norm" in jax.tree_util.keystr(path):
            leaves.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return treedef.unflatten(leaves)


def memory_stats() -> dict:
    import jax

    s = jax.devices()[0].memory_stats() or {}
    return {k: int(s[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in s}


def part_step(config: Path, layout: str, pairs: int, prompt_len: int, steps: int) -> dict:
    import jax
    import numpy as np

    from ld_jax import models
    from ld_jax.compile_plan import memory
    from ld_jax.config import load_config
    from ld_jax.data import pipeline
    from ld_jax.data.formatting import TokenizedPair
    from ld_jax.plan import abstract_params, model_config
    from ld_jax.train import sharding
    from ld_jax.train.config import TrainConfig, model_options
    from ld_jax.train.optim import make_optimizer
    from ld_jax.train.state import init_state
    from ld_jax.train.step import compile_step

    over = ["mesh.fsdp=1", f"data.layout={layout}", f"batch_size={pairs}"]
    cfg = load_config(TrainConfig, config, over)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    name, mconfig = model_config(cfg.model)
    mconfig = mconfig.replace(**model_options(cfg))
    lm = models.LanguageModel.build(mconfig, None)
    rules = sharding.rules_for(mconfig.family)
    optimizer = make_optimizer(cfg.optimizer)
    params = random_params(abstract_params(mconfig, cfg.param_dtype))
    state = init_state(params, optimizer)
    del params
    state_sh = sharding.tree_shardings(state, mesh, rules)
    state = sharding.put(state, state_sh)

    rng = np.random.default_rng(0)
    reply = cfg.data.max_length - prompt_len
    ids = lambda n: rng.integers(3, mconfig.vocab_size, n).tolist()  # noqa: E731
    examples = [
        (TokenizedPair(i, ids(prompt_len), ids(reply), ids(reply)), np.zeros(2, np.float32))
        for i in range(pairs)
    ]
    batch = pipeline.collate(
        examples, pairs, pad_to_multiple=cfg.data.pad_to_multiple, layout=layout
    )
    tokens = int(batch.pair_tokens().sum())  # as two sequences, prompt counted twice
    step = compile_step(lm, cfg.loss, optimizer, mesh, state_sh, batch, cfg.seq_chunk)
    batch = sharding.put(batch, sharding.batch_shardings(batch, mesh))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    compiled_mem = memory(compiled)
    before = memory_stats()
    times, losses = [], []
    for _ in range(2 + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - t0)
    after = memory_stats()
    step_s = float(np.median(times[2:]))
    out = {
        "config": str(config.relative_to(ROOT)),
        "model": name,
        "layout": layout,
        "pairs": pairs,
        "prompt_len": prompt_len,
        "input_shape": list(batch.input_ids.shape),
        "positions_per_step": int(batch.input_ids.size),
        "lm_head_positions_per_step": int(batch.target_ids.size),
        "tokens_per_step": tokens,
        "compile_s": round(compile_s, 1),
        "compiled": compiled_mem,
        "allocator_before_steps": before,
        "allocator_after_steps": after,
        "real_peak_over_compiled_peak": after.get("peak_bytes_in_use", 0)
        / compiled_mem["peak_bytes"],
        "step_s": times[2:],
        "warmup_s": times[:2],
        "median_step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "losses": losses,
        "options": {"remat": cfg.remat, "seq_chunk": cfg.seq_chunk, "dtype": cfg.compute_dtype},
    }
    tpu = COMPILED / f"gemma2b_v5e8_{layout}_prompt{prompt_len}.json"
    if name == "gemma-2b" and tpu.is_file():  # FLOPs are the program's, not the chip's
        flops = json.loads(tpu.read_text())["step_flops"]
        out["executed_flops_per_step_xla"] = flops
        out["executed_tflops_per_s"] = flops / step_s / 1e12
    return out


def smollm2(dtype="float32"):
    import dataclasses

    from ld_jax import models
    from ld_jax.models import loading
    from ld_jax.plan import abstract_params

    config = dataclasses.replace(loading.read_config(SMOLLM2), dtype=dtype)
    params = random_params(abstract_params(config, dtype))
    return models.LanguageModel.build(config, params, None, str(SMOLLM2))


def load_pairs(n=None):
    from ld_jax.data.formatting import TokenizedPair

    pairs = [TokenizedPair(**p) for p in json.loads(PAIRS.read_text())]
    return pairs[:n] if n else pairs


def part_attention() -> dict:
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from ld_jax.data import pipeline
    from ld_jax.train import sharding
    from ld_jax.train.step import compile_logprobs

    lm = smollm2()
    pairs = sorted(load_pairs(), key=lambda p: -p.length)[:16]
    out = {}
    for side in ("right", "left"):
        batch = pipeline.collate(
            [(p, None) for p in pairs], 16, layout="shared_prefix", padding_side=side
        ).sequences()
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
        sh = sharding.tree_shardings(lm.params, mesh, sharding.rules_for(lm.config.family))
        got = {}
        for impl in ("plain", "auto", "cudnn", "xla"):
            m = lm.with_options(attention=impl)
            try:
                got[impl] = np.asarray(compile_logprobs(m, mesh, sh)(lm.params, batch))
            except Exception as e:  # a kernel that refuses these shapes: recorded, not fatal
                got[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ref = got["plain"]
        out[side] = {
            impl: (v if isinstance(v, str) else float(np.abs(v - ref).max()))
            for impl, v in got.items()
            if impl != "plain"
        }
        out[side]["logp_range"] = [float(ref.min()), float(ref.max())]
    return {"max_abs_diff_vs_plain": out, "pairs": 16, "dtype": "float32", "precision": "highest"}


def part_ches() -> dict:
    import jax
    import numpy as np
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    from ches_throughput import time_ld_jax, time_reference
    from common import max_rel_diff
    from transformers import LlamaForCausalLM

    from ld_jax import models

    lm = smollm2()
    pairs = load_pairs(16 if SMOKE else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = tempfile.mkdtemp()
    models.save_pretrained(lm, lm.params, tmp)
    model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()

    time_reference(model, pairs[:4], device)
    ref_s, ref = time_reference(model, pairs, device)
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    out = {"pairs": len(pairs), "tokens_as_two_sequences": tokens, "reference_s": ref_s}
    for bs in (8, 64):
        warm_s, _ = time_ld_jax(lm, pairs, bs)  # compiles every batch shape
        s, ours = time_ld_jax(lm, pairs, bs)
        rel = max_rel_diff(ours, ref, "ches")
        out[f"batch{bs}"] = {
            "warmup_s": warm_s,
            "ld_jax_s": s,
            "ratio_vs_reference": ref_s / s,
            "pairs_per_s": len(pairs) / s,
            "max_rel_diff_ches": rel,
        }
    out["reference_pairs_per_s"] = len(pairs) / ref_s
    values = [r["ches"] for r in ref.values()]
    out["ches_range"] = [float(np.min(values)), float(np.max(values))]
    return out


# GPU_CHECK_SMOKE=1: the same code on SmolLM2 and 2 pairs, to try the script on a CPU first
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
if SMOKE:
    GEMMA = LLAMA = ROOT / "configs" / "dpo_tiny_cpu.yaml"
STEP_SIZE = (2, 16, 1) if SMOKE else (32, 256, 5)  # pairs, prompt tokens, timed steps
PARTS = {
    "step_paired": lambda: part_step(GEMMA, "paired", *STEP_SIZE),
    "step_shared": lambda: part_step(GEMMA, "shared_prefix", *STEP_SIZE),
    "attention": part_attention,
    "ches": part_ches,
    "llama8b": lambda: part_step(LLAMA, "paired", *((2, 16, 1) if SMOKE else (4, 256, 3))),
}


def make_pairs() -> None:
    """Tokenize the CHES benchmark's pairs here (SmolLM2's tokenizer) into .gpu/pairs.json."""
    import ches_throughput

    from ld_jax import models

    lm = models.from_pretrained(ches_throughput.MODEL)
    pairs = ches_throughput.load_pairs(lm, 256, 256)
    PAIRS.parent.mkdir(exist_ok=True)
    fields = ("index", "prompt_ids", "chosen_ids", "rejected_ids")
    PAIRS.write_text(json.dumps([{f: getattr(p, f) for f in fields} for p in pairs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="step_paired,step_shared,attention,ches,llama8b")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--part", help=argparse.SUPPRESS)  # the child process's part
    ap.add_argument("--make-pairs", action="store_true")
    args = ap.parse_args()
    from common import machine, write_result

    if args.make_pairs:
        return make_pairs()
    if args.part:
        rec = PARTS[args.part]()
        Path(os.environ["GPU_CHECK_PART_OUT"]).write_text(json.dumps(rec, indent=1))
        return
    out_dir = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    result = {"date": time.strftime("%Y-%m-%d"), "parts": {}}
    start = time.perf_counter()
    for name in args.parts.split(","):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            result["parts"][name] = {"skipped": f"budget: {left:.0f} s left"}
            continue
        part_out = Path(tempfile.mkdtemp()) / "part.json"
        env = {**os.environ, "GPU_CHECK_PART_OUT": str(part_out)}
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # each part's own peak
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--part", name], env=env, timeout=left)
            rec = (
                json.loads(part_out.read_text())
                if proc.returncode == 0
                else {"error": f"exit {proc.returncode}"}
            )
        except subprocess.TimeoutExpired:
            rec = {"error": f"timed out after {left:.0f} s"}
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        result["parts"][name] = rec
        print(f"== {name}: {json.dumps(rec)[:600]}", flush=True)
        write_result(result, out_dir / "gpu_check.json")
    result["machine"] = machine()
    write_result(result, out_dir / "gpu_check.json")
    summarize(result)


def summarize(result: dict) -> None:
    gib = 2**30
    for name, r in result["parts"].items():
        if "compiled" in r:
            print(
                f"{name:12} {r['layout']:13} {r['positions_per_step']:>6} pos  "
                f"compiled peak {r['compiled']['peak_bytes'] / gib:6.2f} GiB  real peak "
                f"{r['allocator_after_steps'].get('peak_bytes_in_use', 0) / gib:6.2f} GiB  "
                f"step {r['median_step_s']:.3f} s  {r['tokens_per_s']:,.0f} tok/s"
            )
        elif name == "ches" and "batch8" in r:
            for bs in (8, 64):
                b = r[f"batch{bs}"]
                print(
                    f"ches b{bs:<3} {b['ratio_vs_reference']:.1f}x reference "
                    f"({b['pairs_per_s']:.0f} vs {r['reference_pairs_per_s']:.0f} pairs/s), "
                    f"max rel diff {b['max_rel_diff_ches']:.1e}"
                )
        else:
            print(f"{name:12} {json.dumps(r)[:300]}")


if __name__ == "__main__":
    main()
