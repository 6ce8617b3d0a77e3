"""Sampling throughput of SmolLM2-135M-Instruct: ld_jax's jitted KV-cache sampler against
transformers' `generate` (PyTorch, KV cache), same process, same left-padded chat prompts.

    python benchmarks/generate.py [--new 64] [--repeats 3] [--torch-threads N] [--out FILE]

Both decode greedily with no stop token, so every row yields exactly `--new` tokens on both
sides; the greedy tokens are compared as a sanity check. Runs alternate between the two so
that load from other processes hits both alike. Writes benchmarks/results/generate.json (raw
timings, machine, `ratio` = ld_jax tokens/s over transformers tokens/s) and prints the ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import torch
from common import interleaved_times, machine, write_rates
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
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    lm = models.from_pretrained(MODEL)
    ref = AutoModelForCausalLM.from_pretrained(
        str(loading.resolve(MODEL)), dtype=torch.float32
    ).eval()
    tok = lm.tokenizer
    encoded = tok(generate.format_prompts(tok, PROMPTS), add_special_tokens=False)["input_ids"]
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

    tokens = len(PROMPTS) * args.new
    same = outputs["ld_jax"] == outputs["torch"]
    result = {
        "benchmark": "generate",
        "model": MODEL,
        "batch": len(PROMPTS),
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
    write_rates(result, times, tokens, args.out)


if __name__ == "__main__":
    main()
