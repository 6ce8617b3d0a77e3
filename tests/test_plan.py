"""`ld-jax plan` on the paper's Llama-3-8B config (shapes only, no weights) against a hand count
from the published sizes (docs/scaling.md), and the CLI."""

from __future__ import annotations

import pytest

from ld_jax import cli
from ld_jax.config import load_config
from ld_jax.plan import CHIPS, make_plan
from ld_jax.train.config import TrainConfig

LLAMA = "configs/paper/dpo_llama3_8b_v5p32.yaml"
# Llama-3-8B's published config.json sizes, written out again here (independent of ld_jax.architectures)
V, D, L, H, KV, HEAD, FF = 128256, 4096, 32, 32, 8, 128, 14336


def hand_params() -> int:
    per_layer = (
        D * H * HEAD + 2 * D * KV * HEAD + H * HEAD * D + 3 * D * FF + 2 * D
    )  # q k v o, mlp, 2 norms
    return 2 * V * D + L * per_layer + D  # embed + untied lm_head, layers, final norm


@pytest.fixture(scope="module")
def llama_plan():
    cfg = load_config(TrainConfig, LLAMA)
    return cfg, make_plan(cfg, chip="v5p", step_time=1.0)


def test_param_count_and_bytes_per_device(llama_plan):
    cfg, plan = llama_plan
    assert plan.n_params == hand_params()
    assert abs(plan.n_params - 8.03e9) <= 0.005 * 8.03e9
    shards = cfg.mesh.fsdp * cfg.mesh.tensor  # "data" replicates the weights
    assert (cfg.mesh.data, shards) == (2, 8)
    # float32 master weights, every matrix split 8 ways; only the norm vectors (L·2·D + D =
    # 266k values) are replicated, so bytes/device = params·4/8 up to 4·266k·(1 − 1/8) bytes
    replicated = L * 2 * D + D
    expected = (plan.n_params - replicated) * 4 / shards + replicated * 4
    assert plan.param_bytes == expected
    assert abs(plan.param_bytes - plan.n_params * 4 / shards) / plan.param_bytes < 1e-3
    # RMSProp: one float32 accumulator per weight, plus the schedule's int32 step counter
    assert 0 <= plan.opt_bytes - plan.param_bytes <= 16
    assert plan.grad_bytes == plan.param_bytes


def test_flops_and_mfu_match_hand_calculation(llama_plan):
    cfg, plan = llama_plan
    tokens = 2 * 32 * 512
    assert plan.tokens == tokens
    matmul_params = hand_params() - V * D - (L * 2 * D + D)  # the embedding lookup is no matmul
    attention = 3 * L * 2 * (2 * 512 * H * HEAD)  # q·k and p·v per token, forward + backward
    hand = 6 * matmul_params * tokens + attention * tokens
    assert abs(plan.model_flops - hand) / hand < 0.01, (plan.model_flops, hand)
    assert plan.executed_flops > plan.model_flops  # remat recomputes the layers' forward pass
    assert plan.mfu(1.0) == pytest.approx(plan.model_flops / (16 * CHIPS["v5p"][0]))
    assert plan.step_time_at(0.5) == pytest.approx(plan.model_flops / (0.5 * 16 * 459e12))


def test_offloaded_layer_inputs_leave_the_device_estimate(llama_plan):
    import dataclasses

    cfg, plan = llama_plan
    offloaded = make_plan(dataclasses.replace(cfg, offload_activations=True), chip="v5p")
    # remat saves L layer inputs [sequences per device, 512, D] in bf16; they go to host memory
    per_device = 2 * 32 // (cfg.mesh.data * cfg.mesh.fsdp)
    assert plan.act_bytes - offloaded.act_bytes == L * per_device * 512 * D * 2


def test_cli_prints_the_plan(capsys):
    args = [
        "plan",
        "--config",
        "configs/paper/dpo_olmo1b_v5e8.yaml",
        "--chip",
        "v5e",
        "--step-time",
        "2",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "OLMo-1B-hf (olmo): 1.177B parameters" in out
    assert "data=1 fsdp=8 tensor=1 (8 devices)" in out and "MFU" in out and "tokens/s" in out
    assert cli.main([*args[:3], "--chip", "tpu9"]) == 2
    assert "unknown chip" in capsys.readouterr().err
    assert cli.main([*args[:3], "param_dtype=bfloat16"]) == 0
    assert "bfloat16 parameters drop updates" in capsys.readouterr().out
