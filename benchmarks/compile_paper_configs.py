"""Every TPU config of configs/paper/ compiled by the TPU compiler for its slice (`ld-jax plan
--topology`), one config per process and one at a time (the compile is CPU-heavy), with the
wall time of each. Needs libtpu (`pip install 'ld-jax[tpu]'`).

    python benchmarks/compile_paper_configs.py [--label after] [--passes train,reference,ches]

The _it / _instruct configs compile the same program as their base model's (identical
architecture fields, batch, mesh and options; only the chat template of the data differs, which
no shape sees), so they are compiled once and marked `same_program_as`.
Writes benchmarks/results/compile_paper_configs_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOPOLOGY = {"v5e8": "v5e:2x4", "v5p32": "v5p:2x2x4"}  # the slice each config's mesh is for


def program_key(config: Path) -> str:
    """What the compiled program depends on: the architecture and every non-data option."""
    from ld_jax.config import load_config, to_dict
    from ld_jax.plan import model_config
    from ld_jax.train.config import TrainConfig

    cfg = load_config(TrainConfig, str(config))
    _, arch = model_config(cfg.model)
    fields = to_dict(cfg)
    for key in ("model", "output_dir"):
        fields.pop(key)
    fields["data"] = {k: fields["data"][k] for k in ("max_length", "pad_to_multiple", "layout")}
    arch = {k: v for k, v in arch.__dict__.items() if k != "eos_token_ids"}
    return json.dumps([repr(sorted(arch.items())), fields], sort_keys=True, default=str)


def one(config: str, topology: str, passes: str, out: str) -> None:
    """In a fresh process: compile one config, write its report."""
    from ld_jax import compile_plan, files
    from ld_jax.config import load_config
    from ld_jax.train.config import TrainConfig

    cfg = load_config(TrainConfig, config)
    t0 = time.perf_counter()
    report = compile_plan.compile_plan(cfg, topology, tuple(passes.split(",")))
    report = compile_plan.with_estimate(report, cfg)
    report["plan_wall_s"] = round(time.perf_counter() - t0, 1)
    files.write_json(out, report, indent=2)
    print(compile_plan.render(report), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="after")
    p.add_argument("--passes", default="train,reference,ches")
    p.add_argument("--only", nargs="*", help="config file stems to run (default: all TPU ones)")
    p.add_argument("--reuse", action="store_true", help="keep reports already written")
    p.add_argument("--one", nargs=3, metavar=("CONFIG", "TOPOLOGY", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(*args.one[:2], args.passes, args.one[2])

    from benchmarks.common import machine

    configs = sorted(
        c
        for c in (ROOT / "configs/paper").glob("dpo_*.yaml")
        if c.stem.rsplit("_", 1)[1] in TOPOLOGY and (not args.only or c.stem in args.only)
    )
    out_dir = ROOT / "benchmarks/results/compile" / args.label
    rows, done = [], {}
    result = {"label": args.label, "passes": args.passes, "machine_before": machine(), "rows": rows}
    for config in configs:
        topology = TOPOLOGY[config.stem.rsplit("_", 1)[1]]
        key = program_key(config)
        row = {"config": str(config.relative_to(ROOT)), "topology": topology}
        if key in done:
            rows.append({**row, "same_program_as": done[key]["config"], **done[key]["report"]})
            continue
        out = out_dir / f"{config.stem}.json"
        cmd = [sys.executable, __file__, "--passes", args.passes, "--one", str(config), topology]
        t0, load = time.perf_counter(), os.getloadavg()
        if args.reuse and out.is_file():  # an earlier run's report (its own plan_wall_s)
            proc = subprocess.CompletedProcess(cmd, 0)
        else:
            proc = subprocess.run([*cmd, str(out)], capture_output=True, text=True, cwd=ROOT)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            row["load_average_at_start"] = load
        if proc.returncode:
            row["error"] = proc.stderr.strip().splitlines()[-1]
            print(config.stem, "FAILED:", row["error"], flush=True)
            rows.append(row)
            continue
        report = json.loads(out.read_text())
        summary = {
            "report": {
                k: report[k]
                for k in ("mesh", "hbm_bytes", "batch", "options", "compiled", "fits", "estimate")
                if k in report
            }
        }
        summary["report"].update({k: report[k] for k in ("reference", "ches") if k in report})
        done[key] = {"config": row["config"], **summary}
        rows.append({**row, **summary["report"]})
        c = report["compiled"]
        print(
            f"{config.stem} {topology}: peak {c['peak_bytes'] / 2**30:.2f} GiB of "
            f"{report['hbm_bytes'] / 2**30:.0f} GiB, estimate "
            f"{report['estimate']['total_bytes'] / 2**30:.2f} GiB, {report['plan_wall_s']} s",
            flush=True,
        )
    result["machine_after"] = machine()
    path = ROOT / f"benchmarks/results/compile_paper_configs_{args.label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
