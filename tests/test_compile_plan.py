"""`ld-jax plan --topology`: the training step compiled by the TPU compiler (libtpu) for a v5e
slice this host does not have. The compiler's own byte counts are the independent check: its
per-device argument bytes must equal what our partition rules say each device holds, and its
temporaries must grow with the batch. Slow, and skipped without libtpu (the `.[tpu]` extra);
the errors that need no compiler run in the default suite."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import save_tiny_llama
from jax.sharding import NamedSharding

from ld_jax import cli
from ld_jax.compile_plan import batch_shape
from ld_jax.data import pipeline
from ld_jax.data.formatting import TokenizedPair
from ld_jax.errors import LdJaxError
from ld_jax.plan import abstract_mesh, abstract_params, bytes_per_device, model_config
from ld_jax.train import sharding
from ld_jax.train.config import DataConfig, TrainConfig
from ld_jax.train.optim import OptimizerConfig, make_optimizer
from ld_jax.train.state import abstract_state


@pytest.mark.parametrize("layout", ["paired", "shared_prefix"])
@pytest.mark.parametrize("prompt_len", [1, 20])
def test_batch_shape_is_the_pipelines_longest_batch(layout, prompt_len):
    """The shape compiled for is the one `make_batches` gives pairs that fill max_length."""
    cfg = TrainConfig(model="x", data=DataConfig(max_length=100, pad_to_multiple=16, layout=layout))
    reply = list(range(2, 102 - prompt_len))
    pairs = [TokenizedPair(0, [1] * prompt_len, reply, reply[::-1])]
    batch = pipeline.make_batches(pairs, 1, shuffle=False, pad_to_multiple=16, layout=layout)[0]
    r, s, t = batch_shape(cfg, prompt_len)
    assert batch.input_ids.shape[1:] == (r, s) and batch.target_ids.shape[2] == t
    if layout == "shared_prefix" and prompt_len == 1:  # both replies in one row
        assert (s, t) == (208, 208)


def test_unknown_topology_is_one_line_listing_the_known(capsys):
    from ld_jax.compile_plan import topology_devices

    with pytest.raises(
        LdJaxError, match=r"unknown topology 'v9z:2x2'; known: v5e:1x1, .*v5p:2x2x4"
    ):
        topology_devices("v9z:2x2")
    assert (
        cli.main(["plan", "--config", "configs/paper/dpo_gemma2b_v5e8.yaml", "--topology", "x"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "known: v5e:1x1" in err


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny_llama(path)  # d_model 32, d_ff 64, vocab 128: every matrix divides over 4 devices
    return TrainConfig(
        model=str(path),
        batch_size=8,
        compute_dtype="bfloat16",
        remat=True,
        seq_chunk=16,
        data=DataConfig(max_length=64, pad_to_multiple=64),
        optimizer=OptimizerConfig(name="rmsprop", lr=1e-7),
        mesh=sharding.MeshConfig(data=1, fsdp=4, tensor=1),
    )


def expected_argument_bytes(cfg: TrainConfig, small_arrays: bool = True) -> int:
    """Per-device bytes of the step's arguments as our partition rules lay them out: the state
    (step counter, float32 params, RMSProp state) and the batch split over ("data", "fsdp");
    without `small_arrays`, only the batch's sequence and target arrays."""
    _, config = model_config(cfg.model)
    mesh = abstract_mesh(cfg.mesh, 4)
    rules = sharding.rules_for(config.family)
    state = abstract_state(abstract_params(config), make_optimizer(cfg.optimizer))
    state_bytes = bytes_per_device(state, mesh, rules)
    r, seq, targets = batch_shape(cfg)
    rows = cfg.batch_size
    batch = {"seqs": ((rows, r, seq), 4, 3), "targets": ((rows, r, targets), 4, 3)}
    if small_arrays:
        batch.update(pairs=((rows, 2), 4, 2), rows=((rows,), 4, 2))
    split = NamedSharding(mesh, sharding.BATCH)
    batch_bytes = sum(
        count * math.prod(split.shard_shape(shape)) * size for shape, size, count in batch.values()
    )
    return state_bytes + batch_bytes


@pytest.mark.slow
def test_compiled_arguments_match_partition_rules_and_temps_grow_with_batch(tiny_cfg):
    pytest.importorskip("libtpu")
    from ld_jax.compile_plan import compile_plan

    small = compile_plan(tiny_cfg, "v5e:2x2", passes=("train",))
    assert small["devices"] == 4 and small["hbm_bytes"] == 16 * 2**30
    assert small["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    c = small["compiled"]
    # The compiler's bytes cover our own layout of every argument. Not equality: TPU layouts pad
    # each array to (8, 128) tiles, and this tiny model's shards are far below a tile (measured:
    # 144,896 compiled vs 57,656 from the rules).
    assert c["argument_bytes"] >= expected_argument_bytes(tiny_cfg)
    assert c["peak_bytes"] == (
        c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
    )
    big_cfg = dataclasses.replace(tiny_cfg, batch_size=256)
    big = compile_plan(big_cfg, "v5e:2x2", passes=("train",))
    # 32x the batch: the sequence and target arrays grow by what the rules give them (the
    # per-pair scalars are below a tile at both sizes, and unused ones are pruned by jit)
    grown = expected_argument_bytes(big_cfg, False) - expected_argument_bytes(tiny_cfg, False)
    assert big["compiled"]["argument_bytes"] - c["argument_bytes"] >= grown
    assert big["compiled"]["temp_bytes"] > c["temp_bytes"]
    # offload_activations: the layer inputs that remat saves move to host memory
    offloaded_cfg = dataclasses.replace(big_cfg, offload_activations=True)
    offloaded = compile_plan(offloaded_cfg, "v5e:2x2", passes=("train",))
    _, config = model_config(big_cfg.model)
    r, seq, _ = batch_shape(big_cfg)
    rows_per_device = big_cfg.batch_size * r // 4
    saved = config.n_layers * rows_per_device * seq * config.d_model * 2  # bfloat16
    assert big["compiled"]["host_temp_bytes"] == 0
    assert offloaded["compiled"]["host_temp_bytes"] == saved  # measured: 1,048,576 both


def test_a_program_the_compiler_refuses_is_reported_as_not_fitting():
    """libtpu refuses a program over HBM with RESOURCE_EXHAUSTED instead of a memory analysis
    (seen on Llama-3-8B with 2 micro-batches); `plan` reports that as `fits: false` with the
    compiler's line, where it used to crash with a traceback."""
    import jax

    from ld_jax import compile_plan as cp

    message = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required (16.15G)"

    class Refused:
        def lower(self, *args):
            return self

        def compile(self):
            raise jax.errors.JaxRuntimeError(message + "\nmore detail")

    compiled, refused = cp._compile_pass(Refused(), hbm=16 * 2**30)
    assert compiled is None and "16.15G" in refused["compiler_error"]
    report = {
        "model": "m",
        "topology": "v5e:2x4",
        "devices": 8,
        "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
        "hbm_bytes": 16 * 2**30,
        "batch": dict(
            pairs=32,
            rows=32,
            rows_per_pair=2,
            seq_len=512,
            positions_per_step=1,
            layout="paired",
            lm_head_positions_per_step=1,
            micro_batches=2,
        ),
        **refused,
    }
    assert report["fits"] is False and report["compiler_error"] == message
    assert "train step  does NOT fit: RESOURCE_EXHAUSTED" in cp.render(report)

    class Broken(Refused):
        def compile(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cp._compile_pass(Broken(), hbm=16 * 2**30)


@pytest.mark.slow
def test_offloaded_optimizer_state_leaves_the_devices_hbm(tiny_cfg):
    """`offload_optimizer_state`: the compiler counts RMSProp's state as host arguments, and the
    device arguments shrink by it."""
    pytest.importorskip("libtpu")
    from ld_jax.compile_plan import compile_plan

    plain = compile_plan(tiny_cfg, "v5e:2x2", passes=("train",))["compiled"]
    off_cfg = dataclasses.replace(tiny_cfg, offload_optimizer_state=True)
    off = compile_plan(off_cfg, "v5e:2x2", passes=("train",))["compiled"]
    assert plain["host_argument_bytes"] == 0 and off["host_argument_bytes"] > 0
    assert off["argument_bytes"] + off["host_argument_bytes"] >= plain["argument_bytes"]
    assert off["argument_bytes"] < plain["argument_bytes"]
