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

from ld_jax.data.batch import CHOSEN, LAYOUTS, PROMPT, REJECTED, PairBatch
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
    layout: str = "paired",
    rows: slice | None = None,
    padded_rows: int | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """A dataset of `num_epochs * ceil(len(pairs) / batch_size)` batches (floor with
    `drop_remainder`, which drops each epoch's last incomplete batch).

    ref_logps: `[len(pairs), 2]` reference log-probs of (chosen, rejected), in `pairs` order.
    seq_len: pad every batch to this length; otherwise to the batch's longest row rounded up to
        `pad_to_multiple`, which bounds the number of distinct shapes the step compiles for
        (the response-token axis T is rounded the same way).
    layout: "paired" (two rows per pair) or "shared_prefix" (one packed row, `data.batch`).
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
    if layout not in LAYOUTS:
        raise LdJaxError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    longest = max(row_length(p, layout) for p in pairs)
    if seq_len is not None and longest > seq_len:
        raise LdJaxError(
            f"seq_len={seq_len} is shorter than the longest {layout} row ({longest} tokens)"
        )

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
        length, targets = padded_lengths([p for p, _ in batch], pad_to_multiple, layout)
        length = seq_len or length  # of the whole batch: every process builds one shape
        out = collate(
            batch[rows],
            n_rows,
            pad_id,
            pad_to_multiple,
            length,
            padding_side,
            layout,
            min(targets, length),
        )
        if ref_logps is not None and out.ref_logps is None:  # these rows are all padding
            out = out.with_ref(np.zeros((n_rows, 2), np.float32))
        return out

    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn).repeat(num_epochs)


def steps_per_epoch(num_pairs: int, batch_size: int) -> int:
    return math.ceil(num_pairs / batch_size)


def row_length(p: TokenizedPair, layout: str = "paired") -> int:
    """Tokens the longest row of pair `p` holds in `layout`."""
    if layout == "paired":
        return p.length
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def _targets_per_row(p: TokenizedPair, layout: str) -> int:
    """Response tokens (log-probs to compute) in the longest row of `p`."""
    if layout == "paired":
        return max(len(p.chosen_ids), len(p.rejected_ids))
    return len(p.chosen_ids) + len(p.rejected_ids)


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def padded_lengths(
    pairs: Sequence[TokenizedPair], pad_to_multiple: int, layout: str = "paired"
) -> tuple[int, int]:
    """(S, T) of a batch of `pairs`: its longest row and its most response tokens in a row,
    each rounded up to `pad_to_multiple` (T at most S)."""
    seq = _round_up(max(row_length(p, layout) for p in pairs), pad_to_multiple)
    targets = _round_up(max(_targets_per_row(p, layout) for p in pairs), pad_to_multiple)
    return seq, min(targets, seq)


def _rows(p: TokenizedPair, layout: str):
    """The rows of pair `p`: lists of (token ids, segment) pieces, a prompt first."""
    prompt = (p.prompt_ids, PROMPT)
    chosen, rejected = (p.chosen_ids, CHOSEN), (p.rejected_ids, REJECTED)
    if layout == "paired":
        return [[prompt, chosen], [prompt, rejected]]
    return [[prompt, chosen, rejected]]


def collate(
    examples: Sequence[tuple[TokenizedPair, np.ndarray | None]],
    batch_size: int,
    pad_id: int = 0,
    pad_to_multiple: int = 64,
    seq_len: int | None = None,
    padding_side: str = "right",
    layout: str = "paired",
    target_len: int | None = None,
) -> PairBatch:
    """Pad up to `batch_size` (pair, ref log-probs) examples into one PairBatch in `layout`
    (`data.batch`). seq_len, target_len: S and T (default `padded_lengths` of the examples).

    Every response starts after the prompt: its tokens have positions P, P+1, ... and the
    first is predicted by the prompt's last state (in a packed row y− too, not by y+'s last)."""
    if layout not in LAYOUTS:
        raise LdJaxError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    seq_default, target_default = padded_lengths([p for p, _ in examples], pad_to_multiple, layout)
    seq_len = seq_len or seq_default
    target_len = target_len or min(target_default, seq_len)
    n_rows = 2 if layout == "paired" else 1
    shape, target_shape = (batch_size, n_rows, seq_len), (batch_size, n_rows, target_len)
    ids = np.full(shape, pad_id, np.int32)
    segments, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    predict_from = np.zeros(target_shape, np.int32)
    target_ids = np.full(target_shape, pad_id, np.int32)
    target_segments = np.zeros(target_shape, np.int32)
    rewards = np.zeros((batch_size, 2), np.float32)
    valid = np.zeros(batch_size, np.float32)
    index = np.full(batch_size, -1, np.int32)
    for b, (p, _) in enumerate(examples):
        if not p.prompt_ids:
            raise LdJaxError(
                f"pair {p.index} has an empty prompt: nothing predicts its first token"
            )
        n_prompt = len(p.prompt_ids)
        for r, pieces in enumerate(_rows(p, layout)):
            n = sum(len(tokens) for tokens, _ in pieces)
            at = 0 if padding_side == "right" else seq_len - n
            t = 0  # next target slot of this row
            for tokens, segment in pieces:
                k = len(tokens)
                ids[b, r, at : at + k] = tokens
                segments[b, r, at : at + k] = segment
                if segment == PROMPT:
                    positions[b, r, at : at + k] = np.arange(k)
                    prompt_end = at + k - 1  # the state that predicts every first response token
                else:
                    positions[b, r, at : at + k] = n_prompt + np.arange(k)
                    predict_from[b, r, t : t + k] = [prompt_end, *range(at, at + k - 1)]
                    target_ids[b, r, t : t + k] = tokens
                    target_segments[b, r, t : t + k] = segment
                    t += k
                at += k
        rewards[b] = (p.reward_chosen or 0.0, p.reward_rejected or 0.0)
        valid[b], index[b] = 1.0, p.index
    batch = PairBatch(
        ids,
        segments,
        positions,
        predict_from,
        target_ids,
        target_segments,
        rewards,
        valid,
        index,
    )
    if examples and examples[0][1] is not None:
        ref = np.zeros((batch_size, 2), np.float32)
        ref[: len(examples)] = np.stack([r for _, r in examples])
        batch = batch.with_ref(ref)
    return batch
