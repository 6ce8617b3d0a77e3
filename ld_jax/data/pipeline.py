"""Batches of preference pairs through `grain`: deterministic shuffle by seed, padding, batching.

A batch is a `data.batch.PairBatch` of NumPy arrays (its docstring has the fields and shapes).
In the paired layout axis 1 of the sequence arrays is (chosen, rejected), which lets the model
run both in one forward pass after a free reshape to `[2B, S]`.

The dataset is a `grain.MapDataset`, so `ds[k]` is batch k: resuming at step k reads the same
batches as an uninterrupted run. Each epoch is shuffled anew from the seed; the last batch of an
epoch is padded to full size (valid = 0) so that every pair is used and shapes stay static.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np

from ld_jax.data.batch import CHOSEN, PROMPT, REJECTED, PairBatch
from ld_jax.data.formatting import TokenizedPair
from ld_jax.errors import LdJaxError


def make_batches(
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int = 1,
    ref_logps: np.ndarray | None = None,
    pad_id: int = 0,
    pad_to_multiple: int = 64,
    seq_len: int | None = None,
    padding_side: str = "right",
    rows: slice | None = None,
    padded_rows: int | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """A dataset of `num_epochs * ceil(len(pairs) / batch_size)` batches (floor with
    `drop_remainder`, which drops each epoch's last incomplete batch).

    ref_logps: `[len(pairs), 2]` reference log-probs of (chosen, rejected), in `pairs` order.
    seq_len: pad every batch to this length; otherwise to the batch's longest pair rounded up to
        `pad_to_multiple`, which bounds the number of distinct shapes the step compiles for.
    padded_rows: rows of every batch array (default batch_size): the batch_size pairs come
        first, then rows with valid = 0 (`train.loop` rounds a batch up to the devices this way
        without changing which pairs form a batch).
    rows: keep only these rows of every batch (a process's share, `train.feed.local_rows`),
        padded to the length of the whole batch so that every process builds arrays of one shape.
    """
    if not pairs:
        raise LdJaxError("no preference pairs to batch")
    if batch_size < 1:
        raise LdJaxError(f"batch_size must be >= 1, got {batch_size}")
    padded_rows = padded_rows or batch_size
    if padded_rows < batch_size:
        raise LdJaxError(f"padded_rows={padded_rows} is fewer than batch_size={batch_size}")
    if padding_side not in ("right", "left"):
        raise LdJaxError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if ref_logps is not None and np.shape(ref_logps) != (len(pairs), 2):
        raise LdJaxError(f"ref_logps must have shape ({len(pairs)}, 2), got {np.shape(ref_logps)}")
    longest = max(p.length for p in pairs)
    if seq_len is not None and longest > seq_len:
        raise LdJaxError(f"seq_len={seq_len} is shorter than the longest pair ({longest} tokens)")

    examples = [
        (p, None if ref_logps is None else np.asarray(ref_logps[i], np.float32))
        for i, p in enumerate(pairs)
    ]
    ds = grain.MapDataset.source(examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # followed by repeat: a new permutation every epoch

    rows = rows or slice(0, padded_rows)
    n_rows = rows.stop - rows.start

    def batch_fn(batch):
        length = seq_len or _padded_length(
            [p for p, _ in batch], pad_to_multiple
        )  # of the whole batch
        out = collate(batch[rows], n_rows, pad_id, pad_to_multiple, length, padding_side)
        if ref_logps is not None and out.ref_logps is None:  # these rows are all padding
            out = out.with_ref(np.zeros((n_rows, 2), np.float32))
        return out

    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn).repeat(num_epochs)


def steps_per_epoch(num_pairs: int, batch_size: int) -> int:
    return math.ceil(num_pairs / batch_size)


def _padded_length(pairs: Sequence[TokenizedPair], pad_to_multiple: int) -> int:
    """The longest pair's length rounded up to `pad_to_multiple`."""
    return pad_to_multiple * math.ceil(max(p.length for p in pairs) / pad_to_multiple)


def collate(
    examples: Sequence[tuple[TokenizedPair, np.ndarray | None]],
    batch_size: int,
    pad_id: int = 0,
    pad_to_multiple: int = 64,
    seq_len: int | None = None,
    padding_side: str = "right",
) -> PairBatch:
    """Pad up to `batch_size` (pair, ref log-probs) examples into one PairBatch."""
    if seq_len is None:
        seq_len = _padded_length([p for p, _ in examples], pad_to_multiple)
    ids = np.full((batch_size, 2, seq_len), pad_id, np.int32)
    segments = np.zeros((batch_size, 2, seq_len), np.int32)
    positions = np.zeros((batch_size, 2, seq_len), np.int32)
    rewards = np.zeros((batch_size, 2), np.float32)
    valid = np.zeros(batch_size, np.float32)
    index = np.full(batch_size, -1, np.int32)
    for b, (p, _) in enumerate(examples):
        for j, (reply, segment) in enumerate(((p.chosen_ids, CHOSEN), (p.rejected_ids, REJECTED))):
            n_prompt, n = len(p.prompt_ids), len(p.prompt_ids) + len(reply)
            start = 0 if padding_side == "right" else seq_len - n
            ids[b, j, start : start + n] = p.prompt_ids + reply
            segments[b, j, start : start + n_prompt] = PROMPT
            segments[b, j, start + n_prompt : start + n] = segment
            positions[b, j, start : start + n] = np.arange(n)
        rewards[b] = (p.reward_chosen or 0.0, p.reward_rejected or 0.0)
        valid[b], index[b] = 1.0, p.index
    batch = PairBatch(ids, segments, positions, rewards, valid, index)
    if examples and examples[0][1] is not None:
        ref = np.zeros((batch_size, 2), np.float32)
        ref[: len(examples)] = np.stack([r for _, r in examples])
        batch = batch.with_ref(ref)
    return batch
