"""Published Hugging Face `config.json` fields of the paper's models, kept as data so that
`ld-jax plan` can size them without their weights on disk (no downloads).

Keys are the checkpoint directory names (the last part of the HF repo id); a config's `model:`
path that does not exist is looked up here by its last path component. Values are read by
`ld_jax.models.from_hf_config` exactly like a downloaded config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

# The values live in architectures.json, next to this file: data, not code.
ARCHITECTURES: dict[str, dict] = {
    name: config
    for name, config in json.loads(
        (Path(__file__).with_name("architectures.json")).read_text()
    ).items()
    if not name.startswith("_")
}
