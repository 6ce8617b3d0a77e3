"""Our parameter pytree -> a Hugging Face checkpoint directory (`ld-jax export`).

The inverse of `loading`: each family's `export_table` (HF tensor name -> our path, the inverse
of its weight table, defined next to it) says which leaf fills which tensor; layers are
unstacked and their matrices transposed back to torch's Linear layout [out, in]. The result is
what `transformers.AutoModelForCausalLM.from_pretrained` reads: config.json (the source
checkpoint's, with the dtype set; a multimodal Gemma 3 becomes its text model), safetensors
shards with an index, and the tokenizer files. Every file is written atomically, the index
last, so an interrupted export never looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from ld_jax import files
from ld_jax.errors import LdJaxError
from ld_jax.models import loading
from ld_jax.models.config import Params
from ld_jax.models.registry import family

INDEX = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Files of the source directory besides weights and config that a HF directory carries.
_EXTRA_FILES = ("generation_config.json",)


def hf_tensors(config, params: Params, dtype: str = "float32") -> dict[str, np.ndarray]:
    """HF tensor name -> host array in `dtype`, in torch's layout, from our pytree."""
    entry = family(config.family)
    table = entry.weights(config)
    np_dtype = _NP_DTYPES[dtype]
    host = jax.device_get(params)
    tensors = {}
    for hf_name, path in entry.export_table.items():
        if path not in table:  # the LM head of tied embeddings
            continue
        if not path.startswith("layers/"):
            tensors[hf_name] = np.asarray(host[path]).astype(np_dtype)
            continue
        stacked = np.asarray(host["layers"][path[len("layers/") :]])
        for i in range(config.n_layers):
            value = stacked[i].T if stacked.ndim == 3 else stacked[i]  # [in, out] -> [out, in]
            tensors[hf_name.format(i=i)] = np.ascontiguousarray(value).astype(np_dtype)
    for hf_name, value in tensors.items():  # the table's shapes, as loading checks them
        path = entry.export_table[_template(hf_name)]
        expected = tuple(getattr(config, f) for f in table[path][1])
        if value.shape != expected:
            raise LdJaxError(
                f"parameter {path} gives {hf_name} shape {value.shape}, expected {expected}"
            )
    return tensors


def _template(hf_name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'model.layers.{i}.mlp.up_proj.weight'."""
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        parts[2] = "{i}"
    return ".".join(parts)


def hf_config(lm, dtype: str = "float32") -> dict:
    """The config.json to write: the source checkpoint's, with `dtype`; a multimodal Gemma 3
    is written as its text model, which is all that ld_jax holds of it."""
    if lm.source is None or not (Path(lm.source) / "config.json").is_file():
        raise LdJaxError(
            "the model has no source checkpoint directory with a config.json; load it with "
            "models.from_pretrained(...) to export it"
        )
    config = json.loads((Path(lm.source) / "config.json").read_text())
    if config.get("model_type") == "gemma3":
        config = {**config["text_config"], "model_type": "gemma3_text"}
        config["architectures"] = ["Gemma3ForCausalLM"]
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    return config


def save_pretrained(
    lm, params: Params, out_dir, dtype: str = "float32", max_shard_bytes: int = 2 * 1024**3
) -> Path:
    """Write `params` (our layout, e.g. trained) with `lm`'s config and tokenizer as a HF
    checkpoint directory. Returns the directory.

    dtype: "float32" or "bfloat16", of the written tensors.
    max_shard_bytes: the largest safetensors shard; tensors are never split."""
    from safetensors.numpy import save_file

    if dtype not in _NP_DTYPES:
        raise LdJaxError(f"export dtype {dtype!r} not supported; use float32 or bfloat16")
    out = Path(out_dir)
    config = hf_config(lm, dtype)
    # What the written config reads as must be the architecture the params were trained as.
    written = loading.from_hf_config(config)
    if written.replace(dtype=lm.config.dtype) != lm.config.replace(
        remat=False, unroll_layers=False
    ):
        raise LdJaxError(f"{lm.source}: its config.json does not describe this model's config")
    tensors = hf_tensors(lm.config, params, dtype)

    shards, size = [[]], 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # incomplete until the new index is written
    weight_map = {}
    for k, names in enumerate(shards, 1):
        shard = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with files.atomic_path(out / shard) as tmp:
            save_file({n: tensors[n] for n in names}, str(tmp), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    files.write_json(out / "config.json", config, indent=2)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(out))
    for name in _EXTRA_FILES:
        if (Path(lm.source) / name).is_file():
            shutil.copyfile(Path(lm.source) / name, out / name)
    total = int(sum(v.nbytes for v in tensors.values()))
    files.write_json(
        out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2
    )
    return out


def export(
    model: str | None,
    out_dir: str,
    checkpoint: str | None = None,
    step: int | None = None,
    dtype: str = "float32",
) -> Path:
    """`ld-jax export`: a model (name or directory) with its own weights, or with the
    parameters of a training run's checkpoint (`checkpoint` = the run directory; its latest
    step unless `step`). Without `model`, the run's config.json names it."""
    from ld_jax import models

    if checkpoint is not None and model is None:
        run_config = Path(checkpoint) / "config.json"
        if not run_config.is_file():
            raise LdJaxError(f"{checkpoint}: no config.json of a training run; pass --model")
        model = json.loads(run_config.read_text())["model"]
    if model is None:
        raise LdJaxError("export needs --model (or --checkpoint of a training run)")
    lm = models.from_pretrained(model)
    params = lm.params
    if checkpoint is not None:
        from ld_jax.train.checkpoint import restore_params

        params = restore_params(Path(checkpoint) / "checkpoints", step)
        shapes = jax.tree.map(np.shape, params)
        if shapes != jax.tree.map(np.shape, lm.params):
            raise LdJaxError(f"{checkpoint}: the checkpoint's parameters are not {model}'s")
    return save_pretrained(lm, params, out_dir, dtype)
