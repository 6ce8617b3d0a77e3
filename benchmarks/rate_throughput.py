"""Exact first-order rate throughput on CPU: `displacement.rate_batches` against per-sample
PyTorch autograd on the transformers model, in the same run, on the same UltraFeedback pairs
(SmolLM2-135M-Instruct, fp32, chat template, prompt+response <= --max-length tokens with the
responses truncated as `ld-jax rate` does):

  (a) ld_jax: `displacement.rate_batches` (bucketed batches, the jitted Gram kernel, the 2×2
      Gram matrices back), after a warm-up that compiles every padded batch shape (its time is
      reported apart);
  (b) reference: per pair, two transformers forward+backward passes at batch 1
      (torch.autograd.grad of ln π(y+|x) and of ln π(y−|x) over every parameter) and the three
      dot products in float64.

Both are timed interleaved, chunk by chunk, so that a shared machine's load falls on both
alike; per-chunk timings and load averages are in the JSON, and the two sides' four keys are
compared (max relative difference). Peak RSS of `ld-jax rate` (a fresh process each) is
measured for --pairs and --rss-pairs pairs. `flops` gives the matmul work each path does
(forward ≈ 2·params·positions, backward twice that), the bound on the ratio at equal speed
per FLOP. Writes benchmarks/results/rate_throughput.json; `ratio` is a/b (higher is better).

    python benchmarks/rate_throughput.py [--pairs 64] [--rss-pairs 256] [--batch-size 1]
                                         [--layout paired|shared_prefix] [--vectorize 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ches_throughput import DATA, MODEL, load_pairs
from common import cli_peak_rss, machine, max_rel_diff, write_result
from tqdm.auto import tqdm

from ld_jax import ches, displacement, models
from ld_jax.data import pipeline
from ld_jax.models import loading

RESULTS = Path(__file__).parent / "results" / "rate_throughput.json"


def time_ld_jax(lm, pairs, batch_size, vectorize, layout):
    """(a) -> (seconds, rates by index) of one pass of the rate generator."""
    start = time.perf_counter()
    rates = {}
    for out in displacement.rate_batches(lm, pairs, batch_size, vectorize, layout=layout):
        for k, i in enumerate(out["index"]):
            rates[int(i)] = {key: float(out[key][k]) for key in displacement.RATE_KEYS}
    return time.perf_counter() - start, rates


def torch_logp(model, prompt, response):
    """Σ over response tokens of ln π(token | prefix): one batch-1 forward, differentiable."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).sum()


def time_reference(model, pairs):
    """(b) per pair: two forward+backward passes and float64 dot products -> (seconds, rates)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def dot(a, b):
        return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))

    rates = {}
    start = time.perf_counter()
    for p in pairs:
        gp = torch.autograd.grad(torch_logp(model, p.prompt_ids, p.chosen_ids), params)
        gm = torch.autograd.grad(torch_logp(model, p.prompt_ids, p.rejected_ids), params)
        pos_sq, cross, neg_sq = dot(gp, gp), dot(gp, gm), dot(gm, gm)
        rates[p.index] = dict(pos_sq=pos_sq, cross=cross, neg_sq=neg_sq, rate=pos_sq - cross)
    return time.perf_counter() - start, rates


def interleaved_timings(lm, pairs, batch_size, vectorize, layout, chunk_pairs=8):
    """Time (a) and (b) chunk by chunk (chunk_pairs pairs of the length order each). Every
    batch shape is compiled, and torch run once, before any timing."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(loading.resolve(MODEL)), dtype=torch.float32
    ).eval()
    order = sorted(pairs, key=lambda p: -pipeline.row_length(p, layout))
    rows = -(-batch_size // vectorize) * vectorize
    batches = ches.length_batches(lm, order, rows, 32, layout)
    start = time.perf_counter()
    first = {batches[k].input_ids.shape: k for k in range(len(batches))}
    for k in first.values():
        time_ld_jax(lm, order[k * rows : (k + 1) * rows], batch_size, vectorize, layout)
    warmup_s = time.perf_counter() - start
    time_reference(model, order[:1])

    chunks, ours, ref = [], {}, {}
    for c in tqdm(range(0, len(order), chunk_pairs), desc="a/b by chunk", unit="chunk"):
        chunk = order[c : c + chunk_pairs]
        a_s, rates = time_ld_jax(lm, chunk, batch_size, vectorize, layout)
        b_s, ref_rates = time_reference(model, chunk)
        ours.update(rates)
        ref.update(ref_rates)
        chunks.append(
            dict(pairs=len(chunk), ld_jax_s=a_s, reference_s=b_s, load_average=os.getloadavg()[0])
        )
    return chunks, warmup_s, len(first), ours, ref


def peak_rss(n_pairs: int, args, out_dir: str) -> dict:
    """Peak RSS, wall time and summary of `ld-jax rate --limit n_pairs` in a fresh process."""
    out = Path(out_dir) / f"ultrafeedback_rates_{n_pairs}.jsonl"
    argv = [
        "rate",
        "--model",
        MODEL,
        "--data",
        DATA,
        "--out",
        str(out),
        "--limit",
        str(n_pairs),
        "--max-length",
        str(args.rss_max_length),
        "--batch-size",
        str(args.batch_size),
    ]
    return cli_peak_rss(argv, out, n_pairs)


def flops(lm, pairs, layout: str, batch_size: int) -> dict:
    """Matmul FLOPs of each path, 2·params per position forward and twice that backward
    (attention's quadratic term left out: ≤ 256 positions): (b) a forward and a backward pass
    per response over prompt+y±; (a) the padded batch rows: paired, one forward and one
    backward per row; packed, one forward and two backward passes over the whole row."""
    n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(lm.params))
    reference = sum(
        3 * (2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)) for p in pairs
    )
    positions = sum(
        b.input_ids.size for b in ches.length_batches(lm, pairs, batch_size, 32, layout)
    )
    ours = (3 if layout == "paired" else 5) * positions
    return dict(
        params=n,
        reference=2 * n * reference,
        ld_jax=2 * n * ours,
        padded_positions=positions,
        bound_ratio=reference / ours,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--rss-pairs", type=int, default=256, help="0 skips the RSS comparison")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--vectorize", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rss-from", type=int, default=0, help="the smaller RSS run (default --pairs)")
    ap.add_argument("--rss-max-length", type=int, default=256, help="the RSS runs' --max-length")
    ap.add_argument("--layout", choices=["shared_prefix", "paired"], default="paired")
    ap.add_argument("--out-dir", default=tempfile.gettempdir(), help="the RSS runs' rate files")
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch_threads = torch.get_num_threads()

    lm = models.from_pretrained(MODEL, dtype="float32")
    pairs = load_pairs(lm, args.pairs, args.max_length)
    chunks, warmup_s, shapes, ours, ref = interleaved_timings(
        lm, pairs, args.batch_size, args.vectorize, args.layout
    )
    ours_s, ref_s = (sum(r[k] for r in chunks) for k in ("ld_jax_s", "reference_s"))
    rss = []  # measured after the timings are written (a failed RSS run keeps them)

    def rate(seconds):
        return dict(seconds=seconds, pairs_per_s=len(pairs) / seconds)

    result = dict(
        ratio=ref_s / ours_s,
        warmup_compile_s=warmup_s,
        compiled_shapes=shapes,
        ld_jax=rate(ours_s),
        reference_torch_autograd_batch1=rate(ref_s),
        pairs=len(pairs),
        flops=flops(lm, pairs, args.layout, args.batch_size),
        max_rel_diff_vs_reference={k: max_rel_diff(ours, ref, k) for k in displacement.RATE_KEYS},
        rate_below_zero=dict(
            ld_jax=sum(ours[i]["rate"] < 0 for i in ref),
            reference=sum(ref[i]["rate"] < 0 for i in ref),
        ),
        chunks=chunks,
        peak_rss=rss,
        rss_growth=None,
        config=dict(
            model=MODEL,
            data=DATA,
            dtype="float32",
            batch_size=args.batch_size,
            vectorize=args.vectorize,
            layout=args.layout,
            max_length=args.max_length,
            rss_max_length=args.rss_max_length,
            overflow="truncate",
            template="chat",
            torch_threads=torch_threads,
        ),
        machine=machine(load_average_before=load_before),
    )
    write_result(result, RESULTS)
    if args.rss_pairs:
        for n in (args.rss_from or args.pairs, args.rss_pairs):
            rss.append(peak_rss(n, args, args.out_dir))
        result["rss_growth"] = rss[1]["peak_rss_mb"] / rss[0]["peak_rss_mb"] - 1
        write_result(result, RESULTS)
    print(json.dumps({k: result[k] for k in ("ld_jax", "reference_torch_autograd_batch1")}))
    print(json.dumps(result["max_rel_diff_vs_reference"]))
    print(f"a/b (ld_jax over per-sample PyTorch autograd) = {result['ratio']:.2f}x   target >= 2")
    print(f"FLOP bound on a/b at equal speed per FLOP = {result['flops']['bound_ratio']:.2f}")
    if rss:
        print(
            f"peak RSS {rss[0]['peak_rss_mb']:.0f} MB ({rss[0]['pairs']} pairs) -> "
            f"{rss[1]['peak_rss_mb']:.0f} MB ({rss[1]['pairs']} pairs): "
            f"{100 * result['rss_growth']:+.1f}%   target <= +10%"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
