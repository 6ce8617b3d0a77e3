"""Files written whole or not at all, and the one keyed cache that every cached stage uses.

A result file is first written to a temporary name in its own directory and then renamed over
the target (`os.replace` is atomic on POSIX), so a killed run leaves either the old file or the
new one, never a truncated one that a later run would take as finished.

    write_json(run / "summary.json", summary)
    logps = cached(run / f"ref_logps-{key}.npz", compute, load=load_npz, save=save_npz)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed to `path` when the block finishes, deleted when
    it raises. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """`obj` (dicts, dataclasses, NumPy/JAX arrays inside; NaN becomes null) as JSON."""
    return write_text(path, json.dumps(jsonable(obj), indent=indent) + "\n")


def save_npz(path: str | Path, **arrays) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def cached(
    path: str | Path,
    compute: Callable[[], T],
    load: Callable[[Path], T],
    save: Callable[[Path, T], Any],
    *,
    main: bool = True,
    broadcast: Callable[[Any], Any] | None = None,
    like: T | None = None,
) -> T:
    """The value stored at `path`, or `compute()` saved there atomically.

    `path` must name everything that changes the value (build it with `digest.fingerprint`):
    a cache is only as correct as its key. In a multi-process run only process 0 (`main`) reads
    and writes the file; `broadcast` (`distributed.broadcast_from_main`) gives every process its
    decision and its loaded value (the others pass `like`, an array of the same shape), and
    `compute` runs on all processes together."""
    path = Path(path)
    found = main and path.is_file()
    if broadcast is not None:
        found = bool(broadcast(np.array(found, np.int32)))
    if found:
        value = load(path) if main else like
        return value if broadcast is None else broadcast(value)
    value = compute()
    if main:
        save(path, value)
    return value


def jsonable(obj: Any) -> Any:
    import dataclasses
    import math

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__") and not np.isscalar(obj):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    if isinstance(obj, Path):
        return str(obj)
    return obj
