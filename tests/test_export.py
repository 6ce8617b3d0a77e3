"""Export to Hugging Face format, checked by transformers (the oracle): a tiny model of every
family, its parameters perturbed in our layout so that only a correct inverse of the weight
table gives the same logits, is written by `models.save_pretrained` and read back with
`AutoModelForCausalLM.from_pretrained`; a training run's checkpoint goes through `ld-jax export`."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_pairs
from safetensors import safe_open
from test_models import CASES, build
from transformers import AutoModelForCausalLM

from ld_jax import cli, models
from ld_jax.errors import LdJaxError
from ld_jax.losses import LossConfig
from ld_jax.models import export, family, loading, registry
from ld_jax.train import loop
from ld_jax.train.optim import OptimizerConfig

IDS = np.random.default_rng(3).integers(0, 128, (2, 10)).astype(np.int32)


def perturbed(params, seed=0, scale=0.1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def hf_logits(path, ids, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_every_family_has_the_inverse_of_its_weight_table():
    for entry in registry.FAMILIES.values():
        assert {v: k for k, v in entry.export_table.items()} == {
            k: v[0] for k, v in entry.weight_table.items()
        }
    with pytest.raises(ValueError, match="both map"):
        family.invert_weights({"a": ("x.weight", ()), "b": ("x.weight", ())})


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_export_round_trips_through_transformers(model_type, tmp_path_factory, tmp_path):
    _, lm = build(model_type, tmp_path_factory)
    params = perturbed(lm.params)
    out = models.save_pretrained(lm, params, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((out / export.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    ours = np.asarray(jax.jit(lm.forward)(params, IDS, np.ones_like(IDS)).logits)
    theirs = hf_logits(out, IDS)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the unperturbed model's logits differ: the test sees which weights were written
    assert (
        np.abs(np.asarray(lm.forward(lm.params, IDS, np.ones_like(IDS)).logits) - ours).max() > 1e-2
    )
    # and ld_jax reads its own export back to the same parameters
    again = models.from_pretrained(str(out))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), again.params, params))


def test_bfloat16_export_holds_the_rounded_weights(tmp_path_factory, tmp_path):
    _, lm = build("llama", tmp_path_factory)
    out = models.save_pretrained(lm, lm.params, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    (shard,) = set(json.loads((out / export.INDEX).read_text())["weight_map"].values())
    with safe_open(out / shard, framework="flax") as f:
        wq = np.asarray(f.get_tensor("model.layers.1.self_attn.q_proj.weight"), np.float32)
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    expected = np.asarray(lm.params["layers"]["wq"][1].T.astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(wq, expected)
    # read as float32, it is the model of the rounded weights
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), lm.params)
    ours = np.asarray(lm.forward(rounded, IDS, np.ones_like(IDS)).logits)
    np.testing.assert_allclose(hf_logits(out, IDS), ours, atol=1e-4, rtol=0)


def test_cli_exports_a_training_run_checkpoint(tiny, tmp_path, capsys):
    path, lm = tiny
    cfg = loop.TrainConfig(
        model=str(path),
        output_dir=str(tmp_path / "run"),
        batch_size=4,
        max_steps=3,
        checkpoint_every=1,
        keep_checkpoints=5,
        progress=False,
        final_eval=False,
        loss=LossConfig("dpo", beta=0.5),
        optimizer=OptimizerConfig(name="adamw", lr=1e-2),
    )
    result = loop.train(cfg, model=lm, pairs=random_pairs(12, seed=2))
    assert (
        cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
        == 0
    )
    ours = np.asarray(lm.forward(result.params, IDS, np.ones_like(IDS)).logits)
    np.testing.assert_allclose(hf_logits(tmp_path / "hf", IDS), ours, atol=1e-4, rtol=0)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    # an earlier step is another set of weights
    argv = [
        "export",
        "--checkpoint",
        str(tmp_path / "run"),
        "--step",
        "1",
        "--out",
        str(tmp_path / "s1"),
    ]
    assert cli.main(argv) == 0
    assert np.abs(hf_logits(tmp_path / "s1", IDS) - ours).max() > 1e-3
    capsys.readouterr()
    argv[4] = "9"
    assert cli.main(argv) == 2
    assert "no checkpoint at step 9" in capsys.readouterr().err


def test_export_without_a_source_directory_is_a_one_line_error(tiny, tmp_path):
    _, lm = tiny
    bare = models.LanguageModel.build(lm.config, lm.params)
    with pytest.raises(LdJaxError, match="no source checkpoint"):
        models.save_pretrained(bare, lm.params, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_model_trained_a_few_steps_round_trips_through_transformers(name, tmp_path):
    lm = models.from_pretrained(name)
    cfg = loop.TrainConfig(
        model=name,
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        max_steps=3,
        progress=False,
        final_eval=False,
        loss=LossConfig("dpo", beta=0.1),
        optimizer=OptimizerConfig(name="adamw", lr=1e-4),
    )
    result = loop.train(cfg, model=lm, pairs=random_pairs(6, vocab=1000, seed=4, max_len=8))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), result.params, lm.params)
    assert max(jax.tree.leaves(moved)) > 1e-5  # the exported weights are the trained ones
    assert cli.main(["export", "--checkpoint", cfg.output_dir, "--out", str(tmp_path / "hf")]) == 0
    rows = lm.tokenizer(["The capital of France is", "Hello there, how are"]).input_ids
    n = min(len(r) for r in rows)
    ids = np.asarray([r[:n] for r in rows], np.int32)
    forward = jax.jit(lm.forward)
    ours = np.asarray(forward(result.params, ids, np.ones_like(ids)).logits)
    exported = np.abs(hf_logits(tmp_path / "hf", ids) - ours).max()
    # The export is exact (ld_jax reads back the trained params bit for bit); what is left is
    # torch's and XLA's fp32 arithmetic over 18-30 layers, measured on the untrained model.
    again = models.from_pretrained(str(tmp_path / "hf"))
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), again.params, result.params)
    )
    base_ours = np.asarray(forward(lm.params, ids, np.ones_like(ids)).logits)
    base = np.abs(hf_logits(loading.resolve(name), ids) - base_ours).max()
    print(f"{name}: max |logit diff| exported {exported:.3g}, untrained parity {base:.3g}")
    assert exported <= max(1e-4, 1.5 * base)
