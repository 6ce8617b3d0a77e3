"""Forward throughput of SmolLM2-135M: jitted ld_jax (hidden states + logits) against
transformers' PyTorch model under torch.inference_mode, same process, same inputs.

    python benchmarks/forward.py [--batch 8] [--seq 256] [--repeats 5]

Runs alternate between the two frameworks so that load from other processes hits both alike.
Writes benchmarks/results/forward.json (raw timings, machine, `ratio` = ld_jax tokens/s over
torch tokens/s) and prints it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import interleaved_times, machine, write_rates
from transformers import AutoModelForCausalLM

from ld_jax import models
from ld_jax.models import loading

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results" / "forward.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    lm = models.from_pretrained(MODEL)
    ref = AutoModelForCausalLM.from_pretrained(
        str(loading.resolve(MODEL)), dtype=torch.float32
    ).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)

    forward = jax.jit(lm.forward)
    jax_ids, jax_mask = jnp.asarray(ids), jnp.asarray(mask)
    torch_ids, torch_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()

    def run_jax():
        jax.block_until_ready(forward(lm.params, jax_ids, jax_mask))

    def run_torch():
        with torch.inference_mode():
            ref(input_ids=torch_ids, attention_mask=torch_mask)

    sides = {"ld_jax": run_jax, "torch": run_torch}
    compile_s, times = interleaved_times(sides, args.warmup, args.repeats, "forward benchmark")

    tokens = args.batch * args.seq
    result = {
        "benchmark": "forward",
        "model": MODEL,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": "float32",
        "what": "logits [batch, seq, vocab] and final hidden states from input ids",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ld_jax_compile_s": compile_s,
        "machine": machine(),
    }
    write_rates(result, times, tokens, RESULTS)


if __name__ == "__main__":
    main()
