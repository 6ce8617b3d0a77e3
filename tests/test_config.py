"""YAML configs into frozen dataclasses, with key=value overrides and clear errors."""

import dataclasses

import pytest

from ld_jax.cli import main
from ld_jax.config import ConfigError, load_config
from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str = "demo"
    seeds: tuple[int, ...] = (0,)
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()


def test_yaml_nested_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nseeds: [1, 2]\nloss: {name: ipo}\noptimizer: {lr: 1e-6}\n")
    cfg = load_config(Experiment, path, ["optimizer.name=adamw", "loss.tau=0.5"])
    assert cfg.name == "x" and cfg.seeds == (1, 2)
    assert cfg.loss == LossConfig(name="ipo", tau=0.5)
    assert cfg.optimizer.lr == 1e-6 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.name == "adamw"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"


def test_defaults_without_file():
    assert load_config(Experiment, None) == Experiment()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("nme: x\n", [], "unknown config key"),
        ("loss: {betta: 1}\n", [], "loss.betta"),
        ("loss: {name: dpx}\n", [], "unknown loss"),
        ("[1, 2]\n", [], "mapping"),
        ("name: x\n", ["seeds"], "key=value"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Experiment, path, overrides)


def test_missing_file_is_a_one_line_cli_error(capsys):
    assert main(["models", "info", "/nonexistent/dir"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ld-jax: error:") and "\n" not in err


def test_every_shipped_config_loads():
    """Each YAML under configs/ loads into its command's dataclass (a typo'd key fails here)."""
    from pathlib import Path

    from ld_jax.experiments.percentiles import PercentilesConfig
    from ld_jax.experiments.persona import PersonaConfig
    from ld_jax.experiments.unalign import UnalignConfig
    from ld_jax.flow.simulate import SimulateConfig
    from ld_jax.train.config import TrainConfig

    classes = {
        "dpo": TrainConfig,
        "persona": PersonaConfig,
        "percentiles": PercentilesConfig,
        "unalign": UnalignConfig,
        "flow": SimulateConfig,
    }
    root = Path(__file__).resolve().parents[1] / "configs"
    checked = 0
    for path in sorted(root.rglob("*.yaml")):
        prefix = path.name.split("_")[0]
        if prefix in classes:
            load_config(classes[prefix], path)
            checked += 1
    assert checked >= 30
