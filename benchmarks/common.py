"""What every benchmark records: the machine it ran on, and the tokens/s of each side with the
ratio of ld_jax over its baseline, written as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path


def machine() -> dict:
    """Cores, platform, library versions, XLA flags and the load average right now."""
    import jax
    import torch
    import transformers

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
    }


def write_rates(
    result: dict, times: dict[str, list[float]], tokens: int, out: Path, baseline: str = "torch"
) -> dict:
    """Add each side's timings, median and tokens/s plus `ratio` (ld_jax / baseline) to `result`,
    write it to `out` and print it."""
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {"times_s": ts, "median_s": median, "tokens_per_s": tokens / median}
    result["ratio"] = result["ld_jax"]["tokens_per_s"] / result[baseline]["tokens_per_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"ld_jax {result['ld_jax']['tokens_per_s']:.1f} tok/s, {baseline} {result[baseline]['tokens_per_s']:.1f} tok/s, "
        f"ratio {result['ratio']:.2f}x"
    )
    return result


def interleaved_times(
    sides: dict, warmup: int, repeats: int, desc: str
) -> tuple[float, dict[str, list[float]]]:
    """Time each side `repeats` times, alternating sides so that a change in the machine's load
    hits both alike. The first call of the first side (ld_jax: its compilation) is timed apart
    and returned first; then `warmup` untimed calls of each."""
    import time

    from tqdm import tqdm

    fns = list(sides.items())
    start = time.perf_counter()
    fns[0][1]()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        for _, fn in fns:
            fn()
    times = {name: [] for name, _ in fns}
    for _ in tqdm(range(repeats), desc=desc):
        for name, fn in fns:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return compile_s, times
