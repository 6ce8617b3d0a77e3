"""CHES scoring throughput on CPU: ld_jax against the paper's per-sample PyTorch pipeline.

All measured in one run, on the same UltraFeedback pairs (SmolLM2-135M-Instruct, fp32, chat
template, prompt+response <= --max-length tokens with responses truncated as `ld-jax ches` does):

  (a) ld_jax: `ches.score_batches` (bucketed batches, jitted kernel, scalars back), after a
      warm-up that compiles every padded batch shape (its time is reported);
  (b) reference: the paper's compute_preference_similarity_per_example.py loop: per sample, a
      transformers PyTorch forward with output_hidden_states=True at batch 1, for prompt+y+ and
      prompt+y−, then the sums (its scores are compared with ours as a sanity check);
  (c) ceiling: a bare jitted `lm.hidden_states` over the same padded batches as (a).

(a) and (c) run the shared-prefix layout by default (one packed row [prompt, y+, y−] per pair,
the prompt computed once; `--layout paired` for two rows); `positions_computed` in the JSON
gives the positions each path runs the model over, beside the times.

The three are timed interleaved, chunk by chunk, so that a shared machine's load falls on all
three alike; per-chunk raw timings and load averages are in the JSON. Peak RSS of `ld-jax ches`
(a fresh process each) is measured for --pairs and --rss-pairs pairs.
Writes benchmarks/results/ches_throughput.json; `ratio` is a/b (higher is better).

    python benchmarks/ches_throughput.py [--pairs 256] [--rss-pairs 1000] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import torch
from common import cli_peak_rss, machine, max_rel_diff, write_result
from tqdm.auto import tqdm

from ld_jax import ches, models, scoring
from ld_jax.data import formatting, pipeline, preference
from ld_jax.models import loading
from ld_jax.models.core import TokenLayout

DATA = str(
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback" / "train.jsonl"
)
MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results" / "ches_throughput.json"


def load_pairs(lm, n: int, max_length: int):
    records = preference.load_preferences(DATA)
    pairs, report = formatting.tokenize_preferences(
        records,
        lm.tokenizer,
        max_prompt_length=max_length - 1,
        max_length=None,
        drop_identical=False,
    )
    pairs, _ = scoring.fit_length(pairs, max_length, "truncate", report)
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} usable pairs, asked for {n}")
    return pairs[:n]


LAYOUT = "shared_prefix"  # set by --layout: the layout of (a) and (c)


def by_length(pairs):
    """The order in which `ches.length_batches` batches pairs (longest first)."""
    return sorted(pairs, key=lambda p: -pipeline.row_length(p, LAYOUT))


def time_ld_jax(lm, pairs, batch_size):
    """(a) -> (seconds, scores by index) of one pass of the scoring generator."""
    start = time.perf_counter()
    scores = {}
    for out in ches.score_batches(lm, pairs, batch_size, progress=False, layout=LAYOUT):
        for k, i in enumerate(out["index"]):
            scores[int(i)] = {key: float(out[key][k]) for key in ches.SCORE_KEYS}
    return time.perf_counter() - start, scores


def bare_forward(lm):
    """(c) the model's forward as the kernel runs it: PairBatch [B, R, S] -> [B·R, S, d]."""

    def forward(params, batch):
        def flat(x):
            return x.reshape(-1, x.shape[-1])

        layout = TokenLayout(flat(batch.positions), flat(batch.segments))
        return lm.hidden_states(params, flat(batch.input_ids), layout=layout)

    return jax.jit(forward)


def time_ceiling(forward, lm, batches):
    """(c) over padded batches: no reductions, nothing copied back -> (seconds, padded tokens)."""
    start = time.perf_counter()
    padded_tokens = 0
    for k in range(len(batches)):
        b = batches[k]
        forward(lm.params, jax.device_put(b.sequences())).block_until_ready()
        padded_tokens += b.input_ids.size
    return time.perf_counter() - start, padded_tokens


@torch.no_grad()
def time_reference(model, pairs, device="cpu"):
    """(b) the paper's per-sample loop (batch 1, output_hidden_states=True) -> (seconds, scores)."""
    scores = {}
    start = time.perf_counter()
    for p in pairs:
        query_len = len(p.prompt_ids)
        states = [
            model(
                input_ids=torch.tensor([p.prompt_ids + reply], device=device),
                output_hidden_states=True,
            ).hidden_states[-1][0]
            for reply in (p.chosen_ids, p.rejected_ids)
        ]
        (sp, lp), (sm, lm_) = ((h[query_len - 1 : -1].sum(0), len(h) - query_len) for h in states)
        scores[p.index] = dict(
            ches=float(sp @ sm - sp @ sp),
            ln_ches=float(sp @ sm / (lp * lm_) - sp @ sp / lp**2),
            last_hidden_ip=float(states[0][-1] @ states[1][-1]),
        )
    return time.perf_counter() - start, scores


def interleaved_timings(lm, pairs, batch_size, chunk_batches=4):
    """Time (a), (c) and (b) chunk by chunk (chunk_batches batches of the length order each),
    so that the load of a shared machine falls on all three alike. Every batch shape is
    compiled, and torch run once, before any timing."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(loading.resolve(MODEL)), dtype=torch.float32
    ).eval()
    forward = bare_forward(lm)
    order = by_length(pairs)
    all_batches = ches.length_batches(lm, order, batch_size, layout=LAYOUT)
    start = time.perf_counter()
    for k in {all_batches[k].input_ids.shape: k for k in range(len(all_batches))}.values():
        time_ld_jax(lm, order[k * batch_size : (k + 1) * batch_size], batch_size)
        forward(lm.params, all_batches[k].sequences()).block_until_ready()
    warmup_s = time.perf_counter() - start
    time_reference(model, order[:1])

    size = chunk_batches * batch_size
    rows, ours, ref = [], {}, {}
    for c in tqdm(range(0, len(order), size), desc="a/c/b by chunk", unit="chunk"):
        chunk = order[c : c + size]
        a_s, scores = time_ld_jax(lm, chunk, batch_size)
        c_s, padded = time_ceiling(
            forward, lm, ches.length_batches(lm, chunk, batch_size, layout=LAYOUT)
        )
        b_s, ref_scores = time_reference(model, chunk)
        ours.update(scores)
        ref.update(ref_scores)
        rows.append(
            dict(
                pairs=len(chunk),
                ld_jax_s=a_s,
                ceiling_s=c_s,
                reference_s=b_s,
                padded_tokens=padded,
                load_average=os.getloadavg()[0],
            )
        )
    return rows, warmup_s, ours, ref


def peak_rss_mb(n_pairs: int, max_length: int, batch_size: int, scores_dir: str) -> dict:
    """Peak RSS, wall time and summary of `ld-jax ches --limit n_pairs` in a fresh process."""
    out = Path(scores_dir) / f"ultrafeedback_scores_{n_pairs}.jsonl"
    argv = [
        "ches",
        "--model",
        MODEL,
        "--data",
        DATA,
        "--out",
        str(out),
        "--limit",
        str(n_pairs),
        "--max-length",
        str(max_length),
        "--batch-size",
        str(batch_size),
    ]
    return cli_peak_rss(argv, out, n_pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--rss-pairs", type=int, default=1000, help="0 skips the RSS comparison")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--scores-dir", default=tempfile.gettempdir(), help="where the RSS runs write scores"
    )
    ap.add_argument("--layout", choices=["shared_prefix", "paired"], default="shared_prefix")
    args = ap.parse_args()
    global LAYOUT
    LAYOUT = args.layout
    load_before = os.getloadavg()

    lm = models.from_pretrained(MODEL, dtype="float32")
    pairs = load_pairs(lm, args.pairs, args.max_length)
    real_tokens = sum(
        2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )

    chunks, warmup_s, ours, ref = interleaved_timings(lm, pairs, args.batch_size)
    ours_s, ceiling_s, ref_s = (
        sum(r[k] for r in chunks) for k in ("ld_jax_s", "ceiling_s", "reference_s")
    )
    padded_tokens = sum(r["padded_tokens"] for r in chunks)
    rss = [
        peak_rss_mb(n, args.max_length, args.batch_size, args.scores_dir)
        for n in (args.pairs, args.rss_pairs)
        if args.rss_pairs
    ]

    def rate(seconds):
        return dict(
            seconds=seconds, pairs_per_s=len(pairs) / seconds, tokens_per_s=real_tokens / seconds
        )

    result = dict(
        ratio=ref_s / ours_s,
        ratio_a_over_c=ceiling_s / ours_s,
        warmup_compile_s=warmup_s,
        ld_jax=rate(ours_s),
        reference_torch_batch1=rate(ref_s),
        ceiling_bare_forward=rate(ceiling_s),
        pairs=len(pairs),
        real_tokens=real_tokens,
        padded_tokens=padded_tokens,
        padding_overhead=padded_tokens / real_tokens - 1,
        layout=args.layout,
        # what each path runs the model over: (b) every pair as two unpadded sequences (the
        # prompt twice); (a) and (c) padded rows of the layout (the prompt once when packed)
        positions_computed=dict(reference=real_tokens, ld_jax=padded_tokens, ceiling=padded_tokens),
        max_rel_diff_vs_reference={
            k: max_rel_diff(ours, ref, k) for k in ("ches", "ln_ches", "last_hidden_ip")
        },
        chunks=chunks,
        peak_rss=rss,
        rss_growth=rss[1]["peak_rss_mb"] / rss[0]["peak_rss_mb"] - 1 if rss else None,
        config=dict(
            model=MODEL,
            data=DATA,
            dtype="float32",
            batch_size=args.batch_size,
            max_length=args.max_length,
            overflow="truncate",
            template="chat",
        ),
        machine=machine(load_average_before=load_before),
    )
    write_result(result, RESULTS)
    print(
        json.dumps(
            {k: result[k] for k in ("ld_jax", "reference_torch_batch1", "ceiling_bare_forward")},
            indent=1,
        )
    )
    print(f"a/b (ld_jax over per-sample PyTorch) = {result['ratio']:.2f}x   target >= 3")
    print(f"a/c (ld_jax over bare forward)       = {result['ratio_a_over_c']:.3f}   target >= 0.9")
    if rss:
        print(
            f"peak RSS {rss[0]['peak_rss_mb']:.0f} MB ({rss[0]['pairs']} pairs) -> "
            f"{rss[1]['peak_rss_mb']:.0f} MB ({rss[1]['pairs']} pairs): "
            f"{100 * result['rss_growth']:+.1f}%   target <= +10%"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
