"""Compare the E1/E2/E3 results files of two versions (old/ and new/), key by key.

Keys that by design differ are listed and skipped: wall-clock timings, the machine record, and
paths that name the code or output directories. Everything else must be equal (floats exactly).
Markdown tables are compared byte for byte. Prints a JSON record."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/equiv")
SKIP_KEYS = {
    "seconds",
    "timings",
    "stages",
    "machine",
    "elapsed_s",
    "wall_s",
    "time_s",
    "out_dir",
    "cache_dir",
    "stage_seconds",
}


def walk(a, b, path, diffs, skipped):
    if a == b and not isinstance(a, dict | list):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}"
            if k in SKIP_KEYS or k.endswith("_seconds") or k.endswith("_s"):
                skipped.add(p.split("[")[0])
                continue
            if k not in a or k not in b:
                diffs.append((p, "only in " + ("new" if k in b else "old")))
                continue
            walk(a[k], b[k], p, diffs, skipped)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]", diffs, skipped)
    elif isinstance(a, str) and isinstance(b, str) and "## Wall time" in a:
        if strip_times(a) != strip_times(b):
            diffs.append((path, "differs before its Wall time section"))
        else:
            skipped.add(path + " (its Wall time section)")
    elif isinstance(a, str) and isinstance(b, str) and ("/work/" in a or "/work/" in b):
        if a.replace("/work/wt-old", "CODE").replace("/work/equiv/old", "OUT") != b.replace(
            "/work/wt-equiv", "CODE"
        ).replace("/work/main", "CODE").replace("/work/equiv/new", "OUT"):
            diffs.append((path, f"{a!r} != {b!r}"))
    elif a != b:
        diffs.append((path, f"{a!r} != {b!r}"))


def strip_times(text: str) -> str:
    """Markdown up to its "## Wall time" section (timings differ run to run by design)."""
    return text.split("## Wall time")[0]


report = {}
for exp in ("e1", "e2", "e3"):
    old, new = root / "old" / exp, root / "new" / exp
    diffs, skipped = [], set()
    walk(
        json.loads((old / "results.json").read_text()),
        json.loads((new / "results.json").read_text()),
        "results",
        diffs,
        skipped,
    )
    md_old = sorted(p.relative_to(old) for p in old.rglob("*.md"))
    md_new = sorted(p.relative_to(new) for p in new.rglob("*.md"))
    md_diff = [
        str(p)
        for p in md_old
        if p in md_new and strip_times((old / p).read_text()) != strip_times((new / p).read_text())
    ]
    report[exp] = {
        "results_json_differences": [f"{p}: {d}" for p, d in diffs],
        "skipped_by_design": sorted(skipped),
        "markdown_files": [str(p) for p in md_old],
        "markdown_only_in_one": sorted(set(map(str, md_old)) ^ set(map(str, md_new))),
        "markdown_differing (Wall time sections excluded)": md_diff,
    }
print(json.dumps(report, indent=1))
