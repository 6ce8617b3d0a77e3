"""The model families ld_jax supports: one `family.Family` entry per family, defined in its own
file (weight table, config reader, forward, partition rules). Loading, `ld-jax plan`'s
abstract parameters and sharding all read these entries; adding a family is one file plus one
line here.
"""

from __future__ import annotations

from ld_jax.errors import LdJaxError
from ld_jax.models import gemma, llama, olmo
from ld_jax.models.family import Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (llama.FAMILY, gemma.GEMMA, gemma.GEMMA2, gemma.GEMMA3, olmo.OLMO, olmo.OLMO2)
}
# config.json `model_type` -> family
MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def family(name: str) -> Family:
    """The entry of `ModelConfig.family` `name`."""
    if name not in FAMILIES:
        raise LdJaxError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
