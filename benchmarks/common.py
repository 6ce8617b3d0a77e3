"""What every benchmark records: the machine it ran on, and the tokens/s of each side with the
ratio of ld_jax over its baseline, written as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def machine(**extra) -> dict:
    """Cores, platform, Python and library versions, devices, XLA flags and the load average
    right now (the 1/5/15-minute means: a benchmark is only comparable with its load). Every
    benchmark writes this record under "machine"; `extra` adds benchmark-specific entries."""
    import importlib.metadata as metadata

    import jax

    versions = {}
    for package in ("jax", "jaxlib", "torch", "transformers", "trl", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        **versions,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
    }
    if "torch" in sys.modules:
        record["torch_threads"] = sys.modules["torch"].get_num_threads()
    return {**record, **extra}


def write_result(result: dict, out: Path) -> None:
    """Write a benchmark's JSON atomically (a killed benchmark leaves the old file)."""
    from ld_jax import files

    files.write_json(out, result, indent=2)


def write_rates(
    result: dict, times: dict[str, list[float]], tokens: int, out: Path, baseline: str = "torch"
) -> dict:
    """Add each side's timings, median and tokens/s plus `ratio` (ld_jax / baseline) to `result`,
    write it to `out` and print it."""
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {"times_s": ts, "median_s": median, "tokens_per_s": tokens / median}
    result["ratio"] = result["ld_jax"]["tokens_per_s"] / result[baseline]["tokens_per_s"]
    write_result(result, out)
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


def cli_peak_rss(argv: list[str], out: Path, n_pairs: int) -> dict:
    """Peak RSS (MB), wall time and printed summary of `ld-jax ARGV` run in a fresh process that
    writes `out` (one JSON line per pair)."""
    code = (
        "import resource, sys; from ld_jax import cli; rc = cli.main(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    printed = run.stdout.splitlines()
    kb = int(next(line for line in printed if line.startswith("PEAK_RSS_KB")).split()[1])
    return dict(
        pairs=n_pairs,
        command="ld-jax " + " ".join(argv),
        lines=sum(1 for _ in open(out)),
        peak_rss_mb=kb / 1024,
        wall_s=time.perf_counter() - start,
        summary=[line for line in printed if not line.startswith("PEAK_RSS_KB")],
    )


def max_rel_diff(ours: dict, ref: dict, key: str) -> float:
    """max over ref's keys of |ours − ref| / max(|ref|, 1e-3) of field `key`."""
    import numpy as np

    a = np.array([ours[i][key] for i in ref])
    b = np.array([ref[i][key] for i in ref])
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3)))
