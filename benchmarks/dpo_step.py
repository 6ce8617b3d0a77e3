"""DPO training throughput on CPU: ld_jax's jitted step against TRL's DPOTrainer.

Same model (SmolLM2-135M-Instruct, fp32), same batch (4 UltraFeedback pairs under the chat
template, each prompt+reply cut to exactly 256 tokens: 8 sequences x 256 = 2048 tokens a step),
precomputed reference log-probs on both sides, RMSProp lr 1e-7, no clipping. Each side runs in
its own fresh process (so its peak RSS is its own), one after the other, in this run:

  (a) ld_jax: `train.step.compile_step` (forward on chosen+rejected, DPO loss, grads, optax
      update, donated state), timed after 2 warm-up steps (the first compiles);
  (b) TRL: `DPOTrainer.training_step` (forward, DPO loss, backward) plus the trainer's own
      optimizer step, on a batch made by the trainer's collator, after 2 warm-up steps.

ld_jax runs the shared-prefix layout by default (one packed row [prompt, y+, y−] per pair, the
LM head only where a response token is predicted; `--layout paired` for two rows). Both sides
report the tokens they process: `tokens_per_step` counts each pair as two sequences (the same
on both sides, the basis of tokens/s), `positions_computed_per_step` the rows x length the model
runs, `lm_head_positions_per_step` the positions whose logits are computed.

Both report step-1 loss (ln 2 = policy equals reference) and their reference log-probs, which
must agree: that checks they train on the same tokens. tokens/s = 2048 / median step time.
Writes benchmarks/results/dpo_step.json (or --out); `ratio` is a/b (higher is better).

    python benchmarks/dpo_step.py [--steps 8] [--seq-chunk 128] [--micro-batches 4] [--out F]
                                  [--no-unroll-layers] [--malloc-reuse] [--hugepages]

ld_jax runs with `unroll_layers=True` (the model's run option; docs/performance.md) unless
--no-unroll-layers is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, write_result

DATA = str(
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback" / "train.jsonl"
)
MODEL = "smollm2-135m-instruct"
PAIRS, SEQ, LR, WARMUP = 4, 256, 1e-7, 2
RESULTS = Path(__file__).parent / "results" / "dpo_step.json"
# glibc keeps freed memory for reuse instead of unmapping it, so the large per-step temporaries
# of both XLA and torch are not page-faulted in again every step. Applied to both sides with
# --malloc-reuse; off by default, because the ld_jax worker then grew to 23 GB (OOM-killed).
MALLOC_REUSE = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    "MALLOC_ARENA_MAX": "1",
}
# glibc asks the kernel for transparent huge pages on its large (mmapped) blocks, so fresh
# per-step buffers take 512x fewer page faults; applied to both sides with --hugepages.
HUGEPAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def make_batch_file(path: Path) -> None:
    """Token ids of 4 pairs whose prompt+reply (both replies) reach SEQ tokens, cut to SEQ."""
    from ld_jax import models
    from ld_jax.data import formatting, preference

    lm = models.from_pretrained(MODEL)
    pairs, _ = formatting.tokenize_preferences(
        preference.load_preferences(DATA, limit=200), lm.tokenizer
    )
    chosen = []
    for p in pairs:
        n = SEQ - len(p.prompt_ids)
        if len(p.prompt_ids) <= SEQ // 2 and min(len(p.chosen_ids), len(p.rejected_ids)) >= n:
            chosen.append(
                {
                    "index": p.index,
                    "prompt_ids": p.prompt_ids,
                    "chosen_ids": p.chosen_ids[:n],
                    "rejected_ids": p.rejected_ids[:n],
                }
            )
        if len(chosen) == PAIRS:
            break
    path.write_text(json.dumps(chosen))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ld_jax(
    batch_file: Path,
    steps: int,
    seq_chunk: int | None,
    unroll_layers: bool,
    layout: str,
    micro_batches: int = 1,
) -> dict:
    import jax

    from ld_jax import models
    from ld_jax.data import pipeline
    from ld_jax.data.formatting import TokenizedPair
    from ld_jax.losses import LossConfig
    from ld_jax.train import sharding
    from ld_jax.train.optim import OptimizerConfig, make_optimizer
    from ld_jax.train.state import init_state
    from ld_jax.train.step import compile_logprobs, compile_step

    lm = models.from_pretrained(MODEL, unroll_layers=unroll_layers)
    pairs = [TokenizedPair(**p) for p in json.loads(batch_file.read_text())]
    if layout == "paired":  # every row exactly SEQ tokens: no padding
        batch = pipeline.make_batches(pairs, PAIRS, shuffle=False, seq_len=SEQ)[0]
    else:  # packed rows of 2 * SEQ - prompt tokens, padded to the longest (multiple of 8)
        batch = pipeline.make_batches(
            pairs, PAIRS, shuffle=False, pad_to_multiple=8, layout="shared_prefix"
        )[0]
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.rules_for(lm.config.family)
    param_sh = sharding.tree_shardings(lm.params, mesh, rules)
    params = sharding.put(lm.params, param_sh)
    logprobs = compile_logprobs(lm, mesh, param_sh, seq_chunk)
    batch = batch.with_ref(np.asarray(logprobs(params, batch.sequences())))
    optimizer = make_optimizer(OptimizerConfig(name="rmsprop", lr=LR))
    state = init_state(params, optimizer)
    state_sh = sharding.tree_shardings(state, mesh, rules)
    step = compile_step(
        lm,
        LossConfig("dpo", beta=0.1),
        optimizer,
        mesh,
        state_sh,
        batch,
        seq_chunk,
        micro_batches=micro_batches,
    )
    device_batch = sharding.put(batch, sharding.batch_shardings(batch, mesh))
    times, losses = [], []
    for _ in range(WARMUP + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, device_batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - t0)
    return {
        "step_s": times[WARMUP:],
        "warmup_s": times[:WARMUP],
        "losses": losses,
        "ref_logps": batch.ref_logps.tolist(),
        "tokens_per_step": int(batch.pair_tokens().sum()),  # as two sequences, as TRL's
        "layout": layout,
        "positions_computed_per_step": int(batch.input_ids.size),  # rows x S, padding included
        "lm_head_positions_per_step": int(batch.target_ids.size),
        "peak_rss_mb": peak_rss_mb(),
        "seq_chunk": seq_chunk,
        "micro_batches": micro_batches,
        "unroll_layers": unroll_layers,
    }


def worker_trl(batch_file: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from ld_jax.models import loading

    path = str(loading.resolve(MODEL))
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = json.loads(batch_file.read_text())
    text = Dataset.from_dict(
        {"prompt": ["a"] * PAIRS, "chosen": ["b"] * PAIRS, "rejected": ["c"] * PAIRS}
    )
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            report_to=[],
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=PAIRS,
            precompute_ref_log_probs=True,
            beta=0.1,
            learning_rate=LR,
            optim="rmsprop",
            max_grad_norm=0.0,
            max_length=None,
            lr_scheduler_type="constant",
            disable_tqdm=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=text, processing_class=tokenizer)
        tokens = Dataset.from_dict(
            {k: [r[k] for r in rows] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        )
        tokens = trainer._precompute_ref_logps(tokens, "benchmark", PAIRS)
        inputs = trainer.data_collator([tokens[i] for i in range(PAIRS)])
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, which we bypass
        times, losses = [], []
        for _ in range(WARMUP + steps):
            t0 = time.perf_counter()
            loss = trainer.training_step(trainer.model, inputs)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
    ref = torch.stack([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], 1)
    return {
        "step_s": times[WARMUP:],
        "warmup_s": times[:WARMUP],
        "losses": losses,
        "ref_logps": ref.tolist(),
        "tokens_per_step": int(inputs["attention_mask"].sum()),
        "positions_computed_per_step": int(inputs["input_ids"].numel()),
        "lm_head_positions_per_step": int(inputs["input_ids"].numel()),  # logits everywhere
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def run_worker(name: str, batch_file: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--batch-file",
        str(batch_file),
        "--steps",
        str(args.steps),
    ]
    if args.seq_chunk:
        cmd += ["--seq-chunk", str(args.seq_chunk)]
    cmd.append("--unroll-layers" if args.unroll_layers else "--no-unroll-layers")
    cmd += ["--layout", args.layout, "--micro-batches", str(args.micro_batches)]
    load_before = os.getloadavg()[0]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **(MALLOC_REUSE if args.malloc_reuse else {}),
        **(HUGEPAGES if args.hugepages else {}),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    # The machine may be shared: the 1-minute load average around each side says how much.
    return {
        **json.loads(proc.stdout.strip().splitlines()[-1]),
        "load_1min": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps after 2 warm-up steps")
    ap.add_argument(
        "--seq-chunk", type=int, default=None, help="ld_jax LM-head chunk (default: none)"
    )
    ap.add_argument(
        "--malloc-reuse",
        action="store_true",
        help="run both sides with glibc's memory reuse (see MALLOC_REUSE; may exhaust memory)",
    )
    ap.add_argument(
        "--unroll-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ld_jax's unroll_layers run option (default: on)",
    )
    ap.add_argument(
        "--hugepages",
        action="store_true",
        help="run both sides with glibc.malloc.hugetlb=1 (see HUGEPAGES)",
    )
    ap.add_argument(
        "--layout",
        choices=["shared_prefix", "paired"],
        default="shared_prefix",
        help="ld_jax's batch layout (ld_jax.data.batch; default shared_prefix)",
    )
    ap.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="ld_jax's gradient accumulation (grad_accum_steps): the 4 pairs in this many "
        "micro-batches, the same update with a smaller activation peak (default 1)",
    )
    ap.add_argument(
        "--out", type=Path, default=RESULTS, help=f"result JSON (default {RESULTS.name})"
    )
    ap.add_argument("--worker", choices=["ld_jax", "trl"])
    ap.add_argument("--batch-file", type=Path)
    args = ap.parse_args()
    if args.worker == "ld_jax":
        print(
            json.dumps(
                worker_ld_jax(
                    args.batch_file,
                    args.steps,
                    args.seq_chunk,
                    args.unroll_layers,
                    args.layout,
                    args.micro_batches,
                )
            )
        )
        return
    if args.worker == "trl":
        print(json.dumps(worker_trl(args.batch_file, args.steps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.json"
        make_batch_file(batch_file)
        ours = run_worker("ld_jax", batch_file, args)
        theirs = run_worker("trl", batch_file, args)
    for side in (ours, theirs):
        side["median_step_s"] = float(np.median(side["step_s"]))
        side["tokens_per_s"] = side["tokens_per_step"] / side["median_step_s"]
    ref_diff = float(np.abs(np.array(ours["ref_logps"]) - np.array(theirs["ref_logps"])).max())
    result = {
        "benchmark": "DPO training step, SmolLM2-135M-Instruct, batch 4 pairs x 256 tokens, CPU fp32",
        "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "ld_jax": ours,
        "trl_dpo_trainer": theirs,
        "malloc_env_both_sides": {
            **(MALLOC_REUSE if args.malloc_reuse else {}),
            **(HUGEPAGES if args.hugepages else {}),
        }
        or None,
        "same_tokens_check": {
            "max_ref_logp_diff": ref_diff,
            "step1_loss": [ours["losses"][0], theirs["losses"][0]],
        },
        "machine": machine(),
    }
    write_result(result, args.out)
    print(
        f"ld_jax {ours['tokens_per_s']:.0f} tok/s (peak RSS {ours['peak_rss_mb']:.0f} MB), "
        f"TRL {theirs['tokens_per_s']:.0f} tok/s (peak RSS {theirs['peak_rss_mb']:.0f} MB), "
        f"ratio {result['ratio']:.2f}; ref log-probs agree to {ref_diff:.1e}"
    )


if __name__ == "__main__":
    main()
