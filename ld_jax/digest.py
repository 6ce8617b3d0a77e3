"""Short stable hashes that key cached stages (reference log-probs, CHES scores, finished runs).

One place for them, so that "the same data" and "the same weights" mean the same thing to every
cache: `pairs_digest` hashes the exact token ids, `params_digest` the weights."""

import hashlib
import json

import jax
import numpy as np


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able `parts`: the key of a cached stage or run store."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pairs_digest(pairs) -> str:
    """Hash of the token ids of TokenizedPairs (so of the data, template, tokenizer and length
    limit) and of their record indices. Streams bytes: cheap for tens of thousands of pairs."""
    h = hashlib.blake2b(digest_size=8)
    for p in pairs:
        h.update(
            np.asarray(
                [p.index, -3, *p.prompt_ids, -1, *p.chosen_ids, -1, *p.rejected_ids, -2], np.int64
            ).tobytes()
        )
    return h.hexdigest()


def params_digest(params, sample: int | None = None) -> str:
    """Hash of a parameter pytree: every byte of every leaf, or, with `sample`, up to `sample`
    evenly spaced values per leaf (enough to tell checkpoints apart, and fast on large models)."""
    h = hashlib.blake2b(digest_size=8)
    for leaf in jax.tree.leaves(params):
        x = np.asarray(leaf)
        if sample is not None:
            x = x.ravel()[:: max(1, x.size // sample)][:sample]
        h.update(str((x.shape, x.dtype)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()
