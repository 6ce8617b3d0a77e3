"""The paper's experiments, each a composition of the library's pieces: persona (E1),
percentiles (E2) and unalign (E3)."""

import hashlib
import json


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able `parts`: the key of a cached stage or run store."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
