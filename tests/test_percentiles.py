"""E2 (`ld-jax percentiles`) on a tiny random Llama with a character tokenizer: the trained
windows are the samples an independent NumPy ranking picks, every run starts from the initial
parameters, and a re-run takes the scores, initial log-probs and finished runs from the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import (
    save_tiny_llama,  # noqa: E402
    tiny_tokenizer,  # noqa: E402
)

from ld_jax import ches, cli, models  # noqa: E402
from ld_jax.config import load_config  # noqa: E402
from ld_jax.data import preference  # noqa: E402
from ld_jax.experiments import percentiles  # noqa: E402
from ld_jax.experiments.percentiles import run as percentiles_run  # noqa: E402
from ld_jax.train import loop, reference  # noqa: E402

PERCENTILES = (0, 50, 100)  # trained; the windows of more percentiles are checked untrained
WINDOW = 4


def _rows(n=26, seed=0):
    rng = np.random.default_rng(seed)
    words = ["yes", "no", "maybe", "sure", "never", "the cat", "a dog", "blue", "red!", "ok"]

    def text(k):
        return " ".join(rng.choice(words, k))

    rows = []
    for i in range(n):
        chosen = text(rng.integers(1, 6))
        # some rejected replies share the chosen one's start (similar pairs), some do not
        rejected = chosen[: rng.integers(0, len(chosen))] + text(rng.integers(1, 5))
        rejected += "!" if rejected == chosen else ""
        rows.append({"prompt": f"Q{i}: {text(2)}?", "chosen": chosen, "rejected": rejected})
    rows[3]["rejected"] = rows[3]["chosen"]  # identical replies: not in the pool
    rows[5]["chosen"] = "yes " * 30  # truncated to the length limit
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2")
    model_dir = str(save_tiny_llama(root / "model", tokenizer=tiny_tokenizer(markers=False)))
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return model_dir, data, root


def _overrides(model_dir, data, out, *extra):
    return [
        f"model={model_dir}",
        f"data.source={data}",
        f"out_dir={out}",
        "data.max_length=80",
        "data.max_prompt_length=48",
        "data.pad_to_multiple=80",
        f"window={WINDOW}",
        "seeds=2",
        f"percentiles={list(PERCENTILES)}",
        "batch_size=2",
        "score_batch_size=4",
        "progress=false",
        "optimizer.lr=1e-3",
        *extra,
    ]


def _digest(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def _numpy_window(values: np.ndarray, p: float, size: int) -> set[int]:
    """Positions whose 0-based rank (ties by position) lies in the `size` ranks centred on the
    rank of np.percentile(values, p, method="nearest"), shifted inside [0, n)."""
    n = len(values)
    rank = np.empty(n, int)
    rank[np.lexsort((np.arange(n), values))] = np.arange(n)
    centre = int(np.rint(p / 100 * (n - 1)))
    assert np.sort(values)[centre] == np.percentile(values, p, method="nearest")
    lo = int(np.clip(centre - size // 2, 0, n - size))
    return {i for i in range(n) if lo <= rank[i] < lo + size}


def test_windows_and_initial_params_and_cache(setup, monkeypatch):
    model_dir, data, root = setup
    out = root / "run"
    cfg = load_config(percentiles.PercentilesConfig, None, _overrides(model_dir, data, out))

    calls = []
    real_train = loop.train

    def spy(tc, *, model=None, pairs=None, **kw):
        calls.append((tc.max_steps, _digest(model.params), [p.index for p in pairs]))
        return real_train(tc, model=model, pairs=pairs, **kw)

    initial_passes = []
    real_reference = reference.reference_logps

    def spy_reference(model, pairs, *a, **kw):
        initial_passes.append(_digest(model.params))
        return real_reference(model, pairs, *a, **kw)

    monkeypatch.setattr(loop, "train", spy)
    monkeypatch.setattr(reference, "reference_logps", spy_reference)
    result = percentiles.run_percentiles(cfg)

    # the windows: an independent ranking of independently computed scores of the pool
    lm = models.from_pretrained(model_dir)
    _, pool, report = percentiles_run.training_pool(
        preference.load_preferences(data), lm.tokenizer, cfg
    )
    assert report.counts.get("identical_responses") == 1 and 3 not in {p.index for p in pool}
    assert max(len(p.prompt_ids) + len(p.chosen_ids) for p in pool) == 80  # truncated to fit
    direct = ches.ches_scores(
        lm, *([getattr(p, f) for p in pool] for f in ("prompt_ids", "chosen_ids", "rejected_ids"))
    )
    runs = result["runs"]
    assert len(runs) == 3 * len(PERCENTILES) * 2
    for m in cfg.measures:
        for p in PERCENTILES:
            want = {pool[i].index for i in _numpy_window(direct[m], p, WINDOW)}
            got = [r for r in runs if r["measure"] == m and r["percentile"] == p]
            assert [r["seed"] for r in got] == [0, 1]
            assert all(set(r["indices"]) == want and len(r["indices"]) == WINDOW for r in got), (
                m,
                p,
            )
    for p in (0, 10, 25, 50, 75, 90, 100):  # more percentiles and window sizes, untrained
        for size in (1, 3, 4, len(pool)):
            for m in cfg.measures:
                cfg_p = dataclasses.replace(cfg, percentiles=(p,), window=size)
                got = percentiles_run.windows(direct, cfg_p)[(m, float(p))]
                assert set(got) == _numpy_window(direct[m], p, size), (m, p, size)
    assert set(result["windows"]["ches/p100"]["indices"]) == {
        pool[i].index for i in np.argsort(direct["ches"])[-WINDOW:]
    }

    # every run starts from the initial parameters: the loop is handed the same weights, and
    # its first step sees a policy equal to the model whose log-probs were computed once
    initial = _digest(lm.params)
    assert initial_passes == [initial] and len(calls) == len(
        runs
    )  # the initial log-probs pass, then runs
    assert all(digest == initial for _, digest, _ in calls)
    for r in runs:
        assert r["first_step"]["chosen_logp_change"] == pytest.approx(0.0, abs=1e-4)
        assert r["first_step"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert r["loss_decreased"] and np.isfinite(r["mean_chosen_logp_change"])
    assert not list(out.glob("runs/*/*/checkpoints"))  # deleted once recorded
    assert len(list(out.glob("runs/*/*.json"))) == len(runs)

    # the outputs
    for name in ("results.json", "table.md", "figure2.png", "samples.md"):
        assert (out / name).is_file(), name
    assert "Weights: " in (out / "table.md").read_text()  # where the weights came from
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["spearman"]) == set(cfg.measures)
    assert set(saved["meta"]["stage_seconds"]) >= {
        "scores",
        "initial log-probs",
        "training runs",
        "report",
    }
    samples = (out / "samples.md").read_text()
    top = pool[int(np.argmax(direct["ches"]))].index
    assert samples.count("### ") == 6 and f"### 1. sample {top}:" in samples
    agg = saved["aggregate"]["ches"]
    k = PERCENTILES.index(100)
    seeds = [
        r["mean_chosen_logp_change"]
        for r in runs
        if r["measure"] == "ches" and r["percentile"] == 100
    ]
    assert agg["chosen_min"][k] == pytest.approx(min(seeds)) and agg["chosen_max"][
        k
    ] == pytest.approx(max(seeds))

    # a re-run scores nothing, computes no log-probs and trains nothing
    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(ches, "score_batches", boom)
    monkeypatch.setattr(reference, "dataset_logps", boom)
    calls.clear()
    again = percentiles.run_percentiles(cfg)
    assert calls == []
    assert again["aggregate"] == result["aggregate"]

    # an interrupted run (no record) is the only one trained again
    lost = next(out.glob("runs/*/ches_p50_s1_lr0.001.json"))
    lost.unlink()
    monkeypatch.setattr(reference, "dataset_logps", real_dataset_logps)
    calls.clear()
    percentiles.run_percentiles(cfg)
    assert len(calls) == 1 and lost.is_file()

    # lr search: an lr whose loss blows up is rejected; the next one's search runs (seed 0 of
    # the CHES windows, finished above) are reused, so nothing else trains
    calls.clear()
    searched = percentiles.run_percentiles(dataclasses.replace(cfg, lr_grid=(1e-3, 1e3)))
    assert searched["meta"]["lr"] == 1e-3
    assert [(s["lr"], s["stable"]) for s in searched["meta"]["lr_search"]] == [
        (1e3, False),
        (1e-3, True),
    ]
    assert len(calls) == len(PERCENTILES)  # lr 1e3's search runs


real_dataset_logps = reference.dataset_logps


def test_cli_and_configs(setup, tmp_path, capsys):
    for path in sorted(__import__("pathlib").Path("configs").glob("percentiles_*.yaml")):
        cfg = load_config(percentiles.PercentilesConfig, path)
        assert cfg.window >= 1 and cfg.measures, path
    model_dir, data, _ = setup
    args = ["percentiles", "--config", "configs/percentiles_smollm2_ultrafeedback.yaml"]
    args += _overrides(
        model_dir,
        data,
        tmp_path / "cli",
        "seeds=1",
        "percentiles=[0,100]",
        "measures=[ches]",
        "lr_grid=[]",
    )
    assert cli.main(args) == 0
    assert "Spearman" in capsys.readouterr().out
    assert cli.main(args + ["measures=[nope]"]) == 2
    assert "unknown measure" in capsys.readouterr().err
