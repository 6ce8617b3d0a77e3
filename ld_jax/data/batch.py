"""`PairBatch`: the one type of a batch of preference pairs, from the data pipeline to the step.

Every field's leading axis is the pair axis `B`, so one sharding rule fits every entry. The
sequence arrays are `[B, R, S]`, R rows per pair; the layout says what a row holds:

    paired         R = 2: row 0 is prompt + y+, row 1 is prompt + y−
    shared_prefix  R = 1: one packed row [prompt, y+, y−] (the prompt is computed once)

A token's *segment* says which part of its pair it is (PAD, PROMPT, CHOSEN, REJECTED). The
model's attention mask comes from segments and token order alone (`segment_mask`): a query
sees the earlier keys of the prompt and of its own segment, never a pad, and y− never sees y+.
In the paired layout this is the ordinary causal mask over each row's real tokens. Position
ids are data (`positions`): in the packed row y− restarts where y+ started, right after the
prompt, so every token has the position it has in the paired layout.

The T axis lists the response tokens of a row with the state that predicts each (the prompt's
last state for the first token of y+ and of y−), so that the LM head and the log-softmax run
on `[B·R, T]` positions only, T the batch's most response tokens in a row (rounded up).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3
LAYOUTS = ("paired", "shared_prefix")
DEFAULT_LAYOUT = "shared_prefix"  # equal to paired (tests/test_layout.py), fewer FLOPs


class PairBatch(NamedTuple):
    """A batch of B preference pairs (module docstring for the layouts). NumPy arrays out of
    the pipeline, jax.Arrays inside the step; a pytree, so `jax.tree.map` reaches every field.

        input_ids  int32   [B, R, S]  token ids, `pad_id` on padding
        segments   int32   [B, R, S]  PAD 0, PROMPT 1, CHOSEN 2, REJECTED 3
        positions  int32   [B, R, S]  position ids of the model's RoPE (0 on padding)
        predict_from    int32 [B, R, T]  per response token of the row, the index (into S)
                                         of the state that predicts it (0 on padding)
        target_ids      int32 [B, R, T]  those response tokens
        target_segments int32 [B, R, T]  CHOSEN or REJECTED; PAD on padding
        rewards    float32 [B, 2]     r(x, y±) from the data (0 where the data has none)
        valid      float32 [B]        0 for the rows that pad a batch
        index      int32   [B]        the record index, −1 on padding rows
        ref_logps  float32 [B, 2]     ln π_ref(y±|x), when reference log-probs are given
    """

    input_ids: Any
    segments: Any
    positions: Any
    predict_from: Any = None
    target_ids: Any = None
    target_segments: Any = None
    rewards: Any = None
    valid: Any = None
    index: Any = None
    ref_logps: Any = None

    @property
    def layout(self) -> str:
        return "paired" if self.input_ids.shape[1] == 2 else "shared_prefix"

    @property
    def attention_mask(self):
        """int32 [B, R, S]: 1 on real tokens."""
        return (self.segments != PAD).astype(np.int32)

    @property
    def response_mask(self):
        """int32 [B, R, S]: 1 on response tokens (y+ or y−), the ones whose log-prob counts."""
        return (self.segments >= CHOSEN).astype(np.int32)

    @staticmethod
    def abstract(
        pairs: int, seq_len: int, rows: int = 2, target_len: int | None = None
    ) -> PairBatch:
        """ShapeDtypeStructs of a full batch (with ref_logps): for lowering without data."""

        def struct(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype)

        seq = struct((pairs, rows, seq_len), jnp.int32)
        targets = struct((pairs, rows, target_len or seq_len), jnp.int32)
        return PairBatch(
            seq,
            seq,
            seq,
            targets,
            targets,
            targets,
            rewards=struct((pairs, 2), jnp.float32),
            valid=struct((pairs,), jnp.float32),
            index=struct((pairs,), jnp.int32),
            ref_logps=struct((pairs, 2), jnp.float32),
        )

    def sequences(self) -> PairBatch:
        """Only the sequence fields (the others None): what a log-prob or CHES pass reads."""
        return PairBatch(*self[:6])

    def with_ref(self, ref_logps) -> PairBatch:
        return self._replace(ref_logps=np.asarray(ref_logps, np.float32))

    def pair_tokens(self):
        """float32 [B]: each pair's tokens as two sequences, prompt counted twice (the same in
        both layouts, so throughput compares like with like)."""
        real = (self.segments != PAD).sum((1, 2))
        if self.layout == "shared_prefix":
            real = real + (self.segments == PROMPT).sum((1, 2))
        return real.astype(np.float32)
