"""What a model family is (`Family`): its weight-name table, config reader, forward and
partition rules, in one record that each family file fills in and `models/registry.py` collects."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ld_jax.models.config import ModelConfig, Params


@dataclass(frozen=True)
class Family:
    """Everything ld_jax knows about one model family, in one place (`models/registry.py`
    collects the entries; each family file defines its own).

    weight_table: our parameter path -> (HF tensor name, HF shape as ModelConfig fields). "{i}"
        is the layer index; paths under "layers/" are stacked on a leading [n_layers] axis, and
        their 2-D tensors are torch Linear weights [out, in], stored transposed as [in, out].
    hidden_states(config, params, ids, layout: TokenLayout, cache=None) -> (final hidden
        states, cache).
    partition_rules: (regex on a leaf's path, PartitionSpec) pairs, first match wins
        (`train/sharding.py` applies them).
    renames: prefixes of stored tensor names to rewrite before the table is read.
    export_table: the inverse of weight_table (`invert_weights`), HF tensor name -> our path:
        what `models.save_pretrained` writes, each family's next to its weight table.
    """

    name: str  # ModelConfig.family
    model_types: tuple[str, ...]  # config.json model_type values read as this family
    config_from_hf: Callable[[Any], ModelConfig]
    weight_table: dict[str, tuple[str, tuple[str, ...]]]
    hidden_states: Callable
    partition_rules: tuple
    renames: dict = dataclasses.field(default_factory=dict)
    export_table: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.export_table != invert_weights(self.weight_table):
            raise ValueError(f"family {self.name}: export_table is not the weight table's inverse")

    def weights(self, config: ModelConfig) -> dict:
        """The weight table of this checkpoint (no LM head when the embeddings are tied)."""
        return {
            k: v
            for k, v in self.weight_table.items()
            if k != "lm_head" or not config.tie_embeddings
        }

    def param_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Our layout of each parameter path: layers stacked `[L, ...]`, linears `[in, out]`."""
        shapes = {}
        for leaf, (_, fields) in self.weights(config).items():
            shape = tuple(getattr(config, f) for f in fields)
            if leaf.startswith("layers/"):
                shape = (config.n_layers, *(shape[::-1] if len(shape) == 2 else shape))
            shapes[leaf] = shape
        return shapes

    def abstract_params(self, config: ModelConfig, dtype="float32") -> Params:
        """The parameter pytree as ShapeDtypeStructs: nothing is allocated."""
        params = {"layers": {}}
        for leaf, shape in self.param_shapes(config).items():
            node, name = (
                (params["layers"], leaf[len("layers/") :])
                if leaf.startswith("layers/")
                else (params, leaf)
            )
            node[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        return params


def invert_weights(table: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """A weight table (our path -> (HF name template, HF shape fields)) -> HF name template ->
    our path. The layouts invert by the table's own convention (layers stacked on a leading
    axis, their 2-D tensors transposed), so the names are all the inverse needs; two paths
    written to one HF name would make export ambiguous, so that is refused."""
    inverse = {}
    for path, (hf_name, _) in table.items():
        if hf_name in inverse:
            raise ValueError(f"{inverse[hf_name]} and {path} both map to {hf_name}")
        inverse[hf_name] = path
    return inverse


# Megatron-style over "tensor" (column-parallel in, row-parallel out), ZeRO-3-style over "fsdp"
# on the other matrix axis; the leading [n_layers] axis is never sharded. The optimizer state
# follows the same rules, because its leaves end in the parameter paths.
MATRIX_RULES = (
    (r"(^|/)layers/(wq|wk|wv|w_gate|w_up)$", P(None, "fsdp", "tensor")),  # [L, d_model, out]
    (r"(^|/)layers/(wo|w_down)$", P(None, "tensor", "fsdp")),  # [L, in, d_model]
    (r"(^|/)(embed|lm_head)$", P("tensor", "fsdp")),  # [vocab, d_model]
    (r".*", P()),  # norms, scalars: small, replicated
)
