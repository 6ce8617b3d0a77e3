"""Sampling throughput of SmolLM2-135M-Instruct: ld_jax's jitted KV-cache sampler against
transformers' `generate` (PyTorch, KV cache), same process, same left-padded chat prompts.

    python benchmarks/generate.py [--new 64] [--repeats 3] [--batch 8] [--torch-threads N]
                                  [--out FILE]

Decoding reads every weight once per step, so it is bound by memory bandwidth. The benchmark
also measures this machine's bandwidth (`memory_bandwidth`: NumPy summing a 1 GiB float32
array, which streams it from DRAM once) and reports the bound it implies, bandwidth / weight
bytes steps/s, i.e. that times the batch in tokens/s, with each side as a fraction of it.
`--batch` repeats the 8 prompts to any batch size (the bound grows with the batch; the compute
per step too, until the matmuls, not the weight reads, set the pace).

Both decode greedily with no stop token, so every row yields exactly `--new` tokens on both
sides; the greedy tokens are compared as a sanity check. Runs alternate between the two so
that load from other processes hits both alike. Writes benchmarks/results/generate.json (raw
timings, machine, `ratio` = ld_jax tokens/s over transformers tokens/s) and prints the ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import torch
from common import interleaved_times, machine, write_rates, write_result
from transformers import AutoModelForCausalLM

from ld_jax import generate, models
from ld_jax.generate import SamplingConfig
from ld_jax.models import loading

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results" / "generate.json"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about a cat sleeping in the sun.",
    "How do I pick a lock?",
    "Explain photosynthesis to a ten-year-old in two sentences.",
    "Give me three tips for staying focused while studying.",
    "What is 17 times 23?",
    "Tell me a short story about a robot who learns to paint.",
    "Why is the sky blue?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--batch", type=int, default=len(PROMPTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    lm = models.from_pretrained(MODEL)
    ref = AutoModelForCausalLM.from_pretrained(
        str(loading.resolve(MODEL)), dtype=torch.float32
    ).eval()
    tok = lm.tokenizer
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(args.batch)]
    encoded = tok(generate.format_prompts(tok, prompts), add_special_tokens=False)["input_ids"]
    pad = models.pad_id(lm)
    ids, mask = generate.left_pad(encoded, pad_id=pad)
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=0.0, stop_token_ids=())
    hf_config = copy.deepcopy(ref.generation_config)
    hf_config.eos_token_id = None  # no stop token: exactly args.new tokens per row, as ld_jax
    hf_config.pad_token_id = pad
    torch_ids, torch_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    outputs = {}

    def run_jax():
        outputs["ld_jax"] = np.asarray(
            jax.block_until_ready(generate.sample_batch(lm, ids, mask, sampling).tokens)
        )

    def run_torch():
        with torch.inference_mode():
            out = ref.generate(
                input_ids=torch_ids,
                attention_mask=torch_mask,
                generation_config=hf_config,
                max_new_tokens=args.new,
                do_sample=False,
            )
        outputs["torch"] = out[:, ids.shape[1] :].numpy()

    sides = {"ld_jax": run_jax, "torch": run_torch}
    compile_s, times = interleaved_times(sides, args.warmup, args.repeats, "generate benchmark")

    tokens = args.batch * args.new
    same = outputs["ld_jax"] == outputs["torch"]
    result = {
        "benchmark": "generate",
        "model": MODEL,
        "batch": args.batch,
        "prompt_tokens": [len(e) for e in encoded],
        "new_tokens": args.new,
        "dtype": "float32",
        "what": "greedy decoding of left-padded chat prompts with a KV cache, no stop token",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ld_jax_compile_s": compile_s,
        "greedy_tokens_equal_fraction": float(same.mean()),
        "rows_fully_equal": int(same.all(axis=1).sum()),
        "machine": machine(),
    }
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    bandwidth = memory_bandwidth()
    bound = bandwidth / weight_bytes * args.batch  # tokens/s if each step only read the weights
    result["bandwidth_bound"] = {
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "decode_bound_tokens_per_s": bound,
    }
    write_rates(result, times, tokens, args.out)
    for side in ("ld_jax", "torch"):
        result[side]["fraction_of_bound"] = result[side]["tokens_per_s"] / bound
    write_result(result, args.out)
    print(
        f"bandwidth {bandwidth / 1e9:.1f} GB/s, {weight_bytes / 1e6:.0f} MB of weights: decode "
        f"bound {bound:.1f} tokens/s at batch {args.batch}; ld_jax at "
        f"{result['ld_jax']['fraction_of_bound']:.2f} of it, torch at "
        f"{result['torch']['fraction_of_bound']:.2f}"
    )


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of streaming a `gib` GiB float32 array from memory: the best of `repeats` reads,
    each both by NumPy's sum and by an XLA matrix-vector product (the decode step's own kind of
    weight read, on XLA's threads); the array is far larger than any cache."""
    a = np.ones((int(gib * 2**30) // 4 // 1024, 1024), np.float32)
    x, v = jax.device_put(a), jax.numpy.ones(1024, np.float32)
    matvec = jax.jit(lambda m, v: m @ v)
    matvec(x, v).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        for read in (a.sum, lambda: matvec(x, v).block_until_ready()):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return a.nbytes / best


if __name__ == "__main__":
    main()
