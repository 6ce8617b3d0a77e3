import numpy as np

from ld_jax.data.formatting import TokenizedPair
from ld_jax.digest import fingerprint, pairs_digest, params_digest


def _pairs(last=7):
    return [TokenizedPair(0, [1, 2], [3], [4]), TokenizedPair(5, [1], [6, last], [8])]


def test_pairs_digest_tells_token_boundaries_and_indices_apart():
    assert pairs_digest(_pairs()) == pairs_digest(_pairs())
    assert pairs_digest(_pairs()) != pairs_digest(_pairs(last=9))
    moved = [TokenizedPair(0, [1, 2, 3], [], [4]), _pairs()[1]]  # same ids, other split
    assert pairs_digest(moved) != pairs_digest(_pairs())
    reindexed = [TokenizedPair(1, [1, 2], [3], [4]), _pairs()[1]]
    assert pairs_digest(reindexed) != pairs_digest(_pairs())


def test_params_digest_sees_values_shapes_and_dtypes():
    params = {"w": np.arange(1000, dtype=np.float32), "b": np.zeros(3, np.float32)}
    base = params_digest(params)
    changed = {**params, "b": np.array([0, 0, 1e-7], np.float32)}
    assert params_digest(changed) != base
    assert params_digest({**params, "b": np.zeros((3, 1), np.float32)}) != base
    assert params_digest({**params, "b": np.zeros(3, np.float64)}) != base
    # a sample of 10 values per leaf sees a change at a sampled position only
    w = params["w"].copy()
    w[100] += 1  # position 100 is sampled (stride 100)
    assert params_digest({**params, "w": w}, sample=10) != params_digest(params, sample=10)
    assert params_digest(params, sample=10) != base


def test_fingerprint_is_order_free_over_dict_keys():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint("x", 1) != fingerprint("x", 2)
