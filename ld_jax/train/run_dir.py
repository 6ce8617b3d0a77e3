"""The run directory of `train.loop`: one process at a time (`locked`), where an interrupted run
resumes (`resume_step`), and its metrics log cut back to that step (`metrics_log`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from ld_jax import files
from ld_jax.errors import LdJaxError
from ld_jax.train.checkpoint import Checkpoints


@contextlib.contextmanager
def locked(out: Path):
    """An exclusive lock on the run directory for the block: two processes training into one
    directory would interleave their metrics lines and overwrite each other's checkpoints. The
    OS drops the lock of a killed process by itself."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LdJaxError(
                f"another process (pid {holder}) is training in {out}; wait for it or use another output_dir"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def resume_step(cfg, ckpt: Checkpoints, identity: dict) -> int:
    """The step to resume from (0: start afresh); refuses a checkpoint of another run."""
    latest = ckpt.latest_step() if cfg.resume else None
    if latest is None:
        return 0
    saved = ckpt.meta(latest).get("identity")
    if saved is None:
        differ = ["(the checkpoint records no config: written by an older ld-jax)"]
    else:
        differ = [
            f"{k} ({saved.get(k)!r}, now {identity.get(k)!r})"
            for k in sorted(set(saved) | set(identity))
            if saved.get(k) != identity.get(k)
        ]
    if differ and not cfg.force_resume:
        raise LdJaxError(
            f"cannot resume in {cfg.output_dir}: its checkpoint at step {latest} differs in "
            f"{', '.join(differ)}; use another output_dir, or --force-resume to continue it anyway"
        )
    return latest


def metrics_log(path: Path, start: int, main: bool) -> list[dict]:
    """Records of steps 1..start of an interrupted run, one per step (the last line of each);
    the file is rewritten to hold exactly those. A line torn by a kill is dropped."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and 1 <= record.get("step", 0) <= start:
            by_step[record["step"]] = record
    records = [by_step[s] for s in sorted(by_step)]
    if main:
        files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records
