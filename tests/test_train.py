"""The training step against PyTorch autograd, its options, and the loop: metrics, reference
cache, resume after a kill, the NaN guard, bad input and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import numpy as np
import pytest
from conftest import random_pairs

from ld_jax import cli, logprobs
from ld_jax.data import pipeline
from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig
from ld_jax.models import llama
from ld_jax.train import loop, reference, sharding
from ld_jax.train.checkpoint import Checkpoints
from ld_jax.train.optim import OptimizerConfig, make_optimizer
from ld_jax.train.state import init_state
from ld_jax.train.step import compile_step

BETA = 0.5


def _batch(n=6, seed=5, batch_size=8):
    batch = pipeline.make_batches(
        random_pairs(n, seed=seed), batch_size, shuffle=False, pad_to_multiple=8
    )[0]
    rng = np.random.default_rng(seed)
    batch = batch.with_ref((-rng.uniform(10, 40, (batch_size, 2))).astype(np.float32))
    return batch


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


DPO = LossConfig("dpo", beta=BETA)


def _one_step(lm, batch, opt_cfg, loss_cfg=DPO, **step_options):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(opt_cfg)
    state = init_state(_copy(lm.params), optimizer)  # the step donates the state
    shardings = sharding.tree_shardings(state, mesh, sharding.rules_for(lm.config.family))
    step = compile_step(lm, loss_cfg, optimizer, mesh, shardings, batch, **step_options)
    state, metrics = step(jax.device_put(state, shardings), batch)
    return jax.device_get(state), jax.device_get(metrics)


def _torch_dpo_grads(path, batch):
    """DPO loss (Rafailov et al. eq. 7, mean over valid pairs) and its gradients by torch autograd
    on transformers' model, in our parameter layout."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    b, _, s = batch.input_ids.shape
    ids = torch.tensor(batch.input_ids.reshape(-1, s), dtype=torch.long)
    logits = model(
        input_ids=ids, attention_mask=torch.tensor(batch.attention_mask.reshape(-1, s))
    ).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    lp = (lp * torch.tensor(batch.response_mask.reshape(-1, s))[:, 1:]).sum(-1).reshape(b, 2)
    ref = torch.tensor(batch.ref_logps)
    valid = torch.tensor(batch.valid)
    losses = -F.logsigmoid(BETA * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])))
    loss = (losses * valid).sum() / valid.sum()
    loss.backward()
    named = dict(model.named_parameters())
    grads = {"layers": {}}
    for leaf, (hf_name, _) in llama.WEIGHTS.items():
        if leaf.startswith("layers/"):
            g = [
                named[hf_name.format(i=i)].grad.numpy()
                for i in range(model.config.num_hidden_layers)
            ]
            grads["layers"][leaf[7:]] = np.stack([x.T if x.ndim == 2 else x for x in g])
        else:
            grads[leaf] = named[hf_name].grad.numpy()
    return float(loss.detach()), grads


def test_step_loss_and_gradient_match_torch_autograd(tiny):
    path, lm = tiny
    batch = _batch()
    state, metrics = _one_step(lm, batch, OptimizerConfig(name="sgd", lr=1.0))
    loss, grads = _torch_dpo_grads(path, batch)
    assert abs(metrics["loss"] - loss) < 1e-5
    ours = jax.tree.map(lambda p0, p1: np.asarray(p0) - np.asarray(p1), lm.params, state.params)
    for path_, g in jax.tree_util.tree_leaves_with_path(grads):
        mine = ours["layers"][path_[1].key] if path_[0].key == "layers" else ours[path_[0].key]
        np.testing.assert_allclose(mine, g, atol=2e-6, rtol=1e-3, err_msg=str(path_))
    total = math.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(grads)))
    assert abs(metrics["grad_norm"] - total) < 1e-4 * total


def test_remat_offload_and_chunked_head_do_not_change_the_step(tiny):
    _, lm = tiny
    batch = _batch()
    opt = OptimizerConfig(name="sgd", lr=1.0)  # the update is the gradient itself
    base, m0 = _one_step(lm, batch, opt)
    variants = (
        (lm.with_options(remat=True), {}),
        (lm.with_options(remat=True, remat_offload=True), {}),  # layer inputs in host memory
        (lm, {"seq_chunk": 5}),
    )
    for model, options in variants:
        state, m = _one_step(model, batch, opt, **options)
        assert abs(m["loss"] - m0["loss"]) < 1e-6
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(base.params)):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights(tiny):
    _, lm = tiny
    batch = _batch()
    opt = OptimizerConfig(name="sgd", lr=1.0)
    _, m32 = _one_step(lm, batch, opt)
    s16, m16 = _one_step(lm.with_options(dtype="bfloat16"), batch, opt)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
    assert abs(m16["loss"] - m32["loss"]) < 0.05 * abs(m32["loss"])
    # the update is a bf16 gradient applied to fp32 weights: not representable in bf16
    wq = np.asarray(s16.params["layers"]["wq"])
    assert not np.array_equal(wq, wq.astype(jax.numpy.bfloat16).astype(np.float32))


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulated_step_equals_one_big_batch_with_unequal_valid_rows(tiny, micro_batches):
    _, lm = tiny
    batch = _batch(n=5, batch_size=8)  # 5 valid rows of 8: the micro-batches hold 3/2 or 2/1/1/1
    opt = OptimizerConfig(name="sgd", lr=1.0)  # the update is the gradient itself
    one, m1 = _one_step(lm, batch, opt)
    acc, mk = _one_step(lm, batch, opt, micro_batches=micro_batches)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for key in ("loss", "chosen_logp", "margin", "tokens", "grad_norm"):
        assert mk[key] == pytest.approx(m1[key], rel=1e-5), key


def test_accumulation_in_the_loop_applies_the_remainder_and_weighs_pairs_alike(tiny, tmp_path):
    """10 pairs, batches of 8 pairs: 2 updates per epoch (8, then the remaining 2). With 2
    micro-batches per update every update must equal the unsplit one; optax's MultiSteps (the old
    accumulation) weighed each micro-batch 1/k and never applied a trailing partial one."""
    _, lm = tiny
    kw = dict(
        batch_size=8, num_epochs=1, final_eval=False, optimizer=OptimizerConfig(name="sgd", lr=0.5)
    )
    one = loop.train(_cfg(tmp_path / "one", **kw), model=lm, pairs=PAIRS)
    kw["optimizer"] = OptimizerConfig(name="sgd", lr=0.5, grad_accum_steps=2)
    acc = loop.train(_cfg(tmp_path / "acc", **kw), model=lm, pairs=PAIRS)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert [r["step"] for r in acc.metrics] == [1, 2] and acc.summary["batch"][
        "updates_per_epoch"
    ] == 2
    assert [r["loss"] for r in acc.metrics] == pytest.approx(
        [r["loss"] for r in one.metrics], abs=1e-6
    )


# ---- the loop -----------------------------------------------------------------------------------


def _cfg(out, **kw):
    base = dict(
        output_dir=str(out),
        batch_size=4,
        num_epochs=2,
        seed=3,
        progress=False,
        loss=LossConfig("dpo", beta=BETA),
        optimizer=OptimizerConfig(name="rmsprop", lr=3e-3),
    )
    return loop.TrainConfig(**{**base, **kw})


PAIRS = random_pairs(10, seed=7)  # 3 batches of 4 per epoch, the last one padded


def test_loop_writes_metrics_summary_and_reuses_the_reference_cache(tiny, tmp_path, monkeypatch):
    _, lm = tiny
    result = loop.train(_cfg(tmp_path), model=lm, pairs=PAIRS)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7)) and lines == result.metrics
    for key in (
        "loss",
        "chosen_logp_change",
        "rejected_logp_change",
        "reward_accuracy",
        "grad_norm",
        "tokens_per_s",
    ):
        assert all(np.isfinite(r[key]) for r in lines), key
    assert abs(lines[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at step 1
    # the step's grad program and the forward-only reference pass are fused differently by XLA,
    # so on a multi-device mesh they agree to float32 rounding (1 ulp of a pair's ln π was seen
    # on 8 CPU devices), not bit for bit
    assert abs(lines[0]["chosen_logp_change"]) <= 1e-6 * abs(lines[0]["chosen_logp"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    change = result.final_logps - result.init_logps
    assert summary["mean_chosen_logp_change"] == pytest.approx(change[:, 0].mean(), abs=1e-6)
    assert summary["likelihood_displacement"] == (
        summary["loss_decreased"] and change[:, 0].mean() < 0
    )
    assert abs(summary["loss_init"] - math.log(2)) < 1e-6 and summary["loss_decreased"]

    # the reference log-probs equal a direct computation with the initial weights
    seqs = pipeline.make_batches(PAIRS, 10, shuffle=False)[0]
    direct = jax.jit(lambda p, b: logprobs.pair_logprobs(lm, p, b)[0])(lm.params, seqs)
    np.testing.assert_allclose(result.init_logps, np.asarray(direct), atol=1e-4)
    (cache,) = tmp_path.glob("ref_logps-*.npz")

    calls = []
    monkeypatch.setattr(
        reference, "dataset_logps", lambda *a, **k: calls.append(1) or result.final_logps
    )
    loop.train(
        _cfg(tmp_path / "again", final_eval=False), model=lm, pairs=PAIRS
    )  # new dir: computes
    assert len(calls) == 1
    (tmp_path / "again" / "checkpoints").rename(tmp_path / "again" / "old")  # no resume
    loop.train(
        _cfg(tmp_path / "again", final_eval=False), model=lm, pairs=PAIRS
    )  # same key: cached
    assert len(calls) == 1 and cache.name in {p.name for p in (tmp_path / "again").glob("*.npz")}


def test_a_rerun_in_another_parameter_dtype_recomputes_the_reference(tiny, tmp_path):
    """The reference cache key once left out param_dtype: a bf16 rerun reused fp32 log-probs."""
    _, lm = tiny
    kw = dict(final_eval=False, max_steps=0)
    fp32 = loop.train(_cfg(tmp_path / "a", **kw), model=lm, pairs=PAIRS)
    (tmp_path / "b").mkdir()
    (cache,) = (tmp_path / "a").glob("ref_logps-*.npz")
    shutil.copy(cache, tmp_path / "b" / cache.name)
    bf16 = loop.train(_cfg(tmp_path / "b", param_dtype="bfloat16", **kw), model=lm, pairs=PAIRS)
    assert len(list((tmp_path / "b").glob("ref_logps-*.npz"))) == 2
    assert not np.array_equal(fp32.init_logps, bf16.init_logps)


@pytest.mark.parametrize(
    "change",
    [
        "param_dtype",
        "compute_dtype",
        "seq_chunk",
        "rows",
        "pad_to_multiple",
        "padding_side",
        "pad_id",
        "pairs",
        "weights",
    ],
)
def test_every_input_of_the_reference_cache_is_in_its_key(tiny, tmp_path, monkeypatch, change):
    _, lm = tiny
    calls = []
    real = reference.dataset_logps
    monkeypatch.setattr(
        reference, "dataset_logps", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    base = dict(
        rows=4, param_dtype="float32", seq_chunk=None, padding=reference.Padding(0, 8, "right")
    )
    reference.reference_logps(lm, PAIRS, cache_dir=tmp_path, **base)
    reference.reference_logps(lm, PAIRS, cache_dir=tmp_path, **base)
    assert len(calls) == 1  # the same inputs are read back
    model, pairs, kw = lm, PAIRS, dict(base)
    if change in ("param_dtype", "compute_dtype"):
        kw["param_dtype"] = "bfloat16" if change == "param_dtype" else "float32"
        model = lm.with_options(dtype="bfloat16") if change == "compute_dtype" else lm
    elif change == "seq_chunk":
        kw["seq_chunk"] = 5
    elif change == "rows":  # rows round up to the data-parallel size: change by more than it
        kw["rows"] = 4 + 2 * jax.device_count()
    elif change == "pairs":
        pairs = PAIRS[:-1]
    elif change == "weights":
        model = dataclasses.replace(lm, params=jax.tree.map(lambda x: x * 1.001, lm.params))
    else:
        field = {
            "pad_to_multiple": ("pad_to_multiple", 16),
            "padding_side": ("padding_side", "left"),
            "pad_id": ("pad_id", 3),
        }[change]
        kw["padding"] = dataclasses.replace(base["padding"], **dict([field]))
    reference.reference_logps(model, pairs, cache_dir=tmp_path, **kw)
    assert len(calls) == 2, change


def test_batch_padding_is_logged_in_the_summary_and_strict_batch_refuses_it(tiny, tmp_path, capsys):
    """The batch was once rounded up to the devices silently, which changed the number of steps;
    now the pairs of an update stay as asked and the padding rows are reported."""
    _, lm = tiny
    devices = jax.device_count()
    cfg = _cfg(tmp_path / "a", batch_size=3, num_epochs=1, final_eval=False, progress=True)
    result = loop.train(cfg, model=lm, pairs=PAIRS)
    rows = -(-3 // devices) * devices
    assert result.summary["batch"] == {
        "pairs_per_update": 3,
        "requested_batch_size": 3,
        "rows_per_step": rows,
        "padding_rows_per_step": rows - 3,
        "micro_batches": 1,
        "data_parallel_devices": devices,
        "updates_per_epoch": 4,
        "dropped_pairs_per_epoch": 0,
    }
    assert len(result.metrics) == 4  # ceil(10 / 3), on any number of devices
    assert "batch: 3 pairs per update" in capsys.readouterr().out
    with pytest.raises(
        LdJaxError, match=f"batch_size 3 is not a multiple of .* micro-batches = {2 * devices}"
    ):
        loop.train(
            _cfg(
                tmp_path / "b",
                batch_size=3,
                strict_batch=True,
                optimizer=OptimizerConfig(grad_accum_steps=2),
            ),
            model=lm,
            pairs=PAIRS,
        )
    dropped = loop.train(
        _cfg(tmp_path / "c", batch_size=3, drop_last=True, final_eval=False), model=lm, pairs=PAIRS
    )
    assert len(dropped.metrics) == 6 and dropped.summary["batch"]["dropped_pairs_per_epoch"] == 1


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, tmp_path):
    _, lm = tiny
    full = loop.train(
        _cfg(tmp_path / "full", checkpoint_every=2, final_eval=False), model=lm, pairs=PAIRS
    )

    def kill_after_step_3(step, params, record):
        if step == 3:
            raise Killed  # after step 3's metrics, before its (unscheduled) checkpoint

    cfg = _cfg(tmp_path / "killed", checkpoint_every=2, final_eval=False)
    with pytest.raises(Killed):
        loop.train(cfg, model=lm, pairs=PAIRS, callback=kill_after_step_3)
    resumed = loop.train(cfg, model=lm, pairs=PAIRS)
    assert [r["step"] for r in resumed.metrics] == list(range(1, 7))
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    # the resumed steps saw the same batches and produced the same losses
    assert [r["loss"] for r in resumed.metrics] == pytest.approx(
        [r["loss"] for r in full.metrics], abs=1e-6
    )
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))


def test_offloaded_optimizer_state_lives_on_the_host_and_resumes_to_the_same_run(tiny, tmp_path):
    """`offload_optimizer_state`: RMSProp's state in pinned host memory between steps (the TPU
    fit of docs/scaling.md), killed and resumed, against the plain uninterrupted run."""
    _, lm = tiny
    full = loop.train(_cfg(tmp_path / "full", final_eval=False), model=lm, pairs=PAIRS)
    seen = []

    def kill_after_step_3(step, params, record):
        if step == 3:
            raise Killed

    real_compile = loop.compile_step

    def spy(*args, **kwargs):
        seen.append(args[4].opt_state)  # the state shardings the step is compiled with
        return real_compile(*args, **kwargs)

    cfg = _cfg(tmp_path / "off", checkpoint_every=2, final_eval=False, offload_optimizer_state=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "compile_step", spy)
        with pytest.raises(Killed):
            loop.train(cfg, model=lm, pairs=PAIRS, callback=kill_after_step_3)
        resumed = loop.train(cfg, model=lm, pairs=PAIRS)
    kinds = {s.memory_kind for s in jax.tree.leaves(seen)}
    assert kinds == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert [r["loss"] for r in resumed.metrics] == pytest.approx(
        [r["loss"] for r in full.metrics], abs=1e-6
    )


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    _, lm = tiny
    cfg = _cfg(tmp_path, checkpoint_every=2, final_eval=False, batch_size=2, num_epochs=1)
    loop.train(dataclasses.replace(cfg, max_steps=0), model=lm, pairs=PAIRS)  # writes the cache
    (cache,) = tmp_path.glob("ref_logps-*.npz")
    ds = pipeline.make_batches(PAIRS, 2, seed=cfg.seed)
    poisoned = int(ds[3].index[0])  # a pair of the 4th batch (step 4) of the only epoch
    ref = np.load(cache)["logps"]
    ref[[p.index for p in PAIRS].index(poisoned), 0] = np.nan
    np.savez(cache, logps=ref)
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "metrics.jsonl").unlink(missing_ok=True)
    with pytest.raises(
        LdJaxError, match=r"non-finite loss \(nan\).*at step 4; .*last good checkpoint is step 2"
    ):
        loop.train(cfg, model=lm, pairs=PAIRS)
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 2


def test_cli_train_runs_a_yaml_config_and_reports_bad_input(tiny, tmp_path, capsys):
    path, _ = tiny
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}", "chosen": w, "rejected": w[::-1] + "!"}) + "\n"
            for w in ("yes", "no", "maybe", "sure", "never", "fine")
        )
    )
    args = [
        "train",
        "--config",
        "configs/dpo_tiny_cpu.yaml",
        f"model={path}",
        f"data.source={data}",
        f"output_dir={tmp_path / 'run'}",
        "progress=false",
    ]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 6 and "likelihood_displacement" in summary
    assert "likelihood displacement" in capsys.readouterr().out

    assert cli.main(args + ["loss.name=kto"]) == 2
    assert "unknown loss 'kto'" in capsys.readouterr().err
    data.write_text('{"prompt": "a", "chosen": "", "rejected": ""}\n{"prompt": "a"\n')
    assert cli.main(args + [f"output_dir={tmp_path / 'bad'}"]) == 2
    assert "line 2: malformed JSON" in capsys.readouterr().err


def test_the_datas_reference_logps_are_the_cached_reference(tiny, tmp_path, monkeypatch):
    """TRL's ref_chosen_logps / ref_rejected_logps columns replace the reference pass."""
    _, lm = tiny
    rng = np.random.default_rng(0)
    given = -rng.uniform(5, 30, (len(PAIRS), 2)).astype(np.float32)
    pairs = [dataclasses.replace(p, ref_logps=tuple(map(float, r))) for p, r in zip(PAIRS, given)]
    monkeypatch.setattr(
        reference, "reference_logps", lambda *a, **k: pytest.fail("reference pass ran")
    )
    cfg = _cfg(tmp_path, final_eval=False, max_steps=1, batch_size=10)
    result = loop.train(cfg, model=lm, pairs=pairs)
    np.testing.assert_array_equal(result.init_logps, given)
    seqs = pipeline.make_batches(PAIRS, 10, shuffle=False)[0]
    logps = np.asarray(jax.jit(lambda p, b: logprobs.pair_logprobs(lm, p, b)[0])(lm.params, seqs))
    margin = (logps[:, 0] - given[:, 0]) - (logps[:, 1] - given[:, 1])
    expected = np.mean(np.logaddexp(0.0, -BETA * margin.astype(np.float64)))  # −ln σ(βu)
    assert result.metrics[0]["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(LdJaxError, match="lack ref_chosen_logps"):
        loop.train(_cfg(tmp_path / "b"), model=lm, pairs=[pairs[0], *PAIRS[1:]])


def test_tr_dpo_reference_sync(tiny, tmp_path):
    """α = 1 every step: the reference is the policy, so every step starts at DPO's ln 2 with no
    change of ln π(y+); without the sync the loss moves. A run killed after a sync and resumed
    equals the uninterrupted one (the moving reference is checkpointed)."""
    _, lm = tiny
    base = dict(final_eval=False, reference="on_the_fly", max_steps=4)
    synced = loop.train(
        _cfg(tmp_path / "a1", ref_sync_every=1, ref_mixup_alpha=1.0, **base), model=lm, pairs=PAIRS
    )
    for r in synced.metrics:
        # (to rounding: the reference pass and the step are two compiled functions)
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert abs(r["chosen_logp_change"]) < 1e-4
    plain = loop.train(_cfg(tmp_path / "plain", **base), model=lm, pairs=PAIRS)
    assert abs(plain.metrics[-1]["loss"] - math.log(2)) > 1e-3

    cfg = _cfg(
        tmp_path / "killed", ref_sync_every=2, ref_mixup_alpha=0.5, checkpoint_every=2, **base
    )
    full = loop.train(
        dataclasses.replace(cfg, output_dir=str(tmp_path / "full")), model=lm, pairs=PAIRS
    )

    def kill_after_step_3(step, params, record):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        loop.train(cfg, model=lm, pairs=PAIRS, callback=kill_after_step_3)
    resumed = loop.train(cfg, model=lm, pairs=PAIRS)
    assert [r["loss"] for r in resumed.metrics] == pytest.approx(
        [r["loss"] for r in full.metrics], abs=1e-6
    )
    # the soft update itself: α·π_θ + (1 − α)·π_ref
    a, b = {"w": np.float32([1.0, 2.0])}, {"w": np.float32([3.0, -2.0])}
    np.testing.assert_allclose(reference.sync_reference(a, b, 0.25)["w"], [1.5, 1.0])
    with pytest.raises(ValueError, match="on_the_fly"):
        _cfg(tmp_path, ref_sync_every=2)


def test_a_loss_that_needs_rewards_refuses_data_without_them(tiny, tmp_path):
    """REBEL once trained on zero rewards when the data had none; now it is a one-line error
    that names a record, and nothing is written to the run directory."""
    _, lm = tiny
    cfg = _cfg(tmp_path / "rebel", loss=LossConfig("rebel"), final_eval=False)
    assert all(p.reward_chosen is None for p in PAIRS)
    with pytest.raises(LdJaxError, match="needs rewards.*first: record 0"):
        loop.train(cfg, model=lm, pairs=PAIRS)
    assert not (tmp_path / "rebel" / "checkpoints").exists()
    rewarded = [dataclasses.replace(p, reward_chosen=1.0, reward_rejected=0.0) for p in PAIRS]
    summary = loop.train(cfg, model=lm, pairs=rewarded).summary
    assert math.isfinite(summary["final_train_batch_loss"])
