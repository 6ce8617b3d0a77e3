"""HF checkpoint directory -> (ModelConfig, parameter pytree, tokenizer).

config.json picks the family by `model_type`; the family's weight table (data, in its own
file) says which safetensors tensor fills which pytree leaf and with what shape. Only
safetensors are read: no pickle, no remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from ld_jax.errors import LdJaxError
from ld_jax.models.config import ModelConfig, Params
from ld_jax.models.registry import MODEL_TYPES, family

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def from_hf_config(hf) -> ModelConfig:
    """A config.json dict or a transformers PretrainedConfig -> ModelConfig.

    transformers' config classes fill defaults and normalize legacy keys (e.g. `rope_theta` /
    `rope_scaling` into v5 `rope_parameters`), so a sparse config.json reads as HF reads it.
    """
    from transformers import AutoConfig

    model_type = hf.get("model_type") if isinstance(hf, dict) else getattr(hf, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise LdJaxError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    if isinstance(hf, dict):
        try:
            hf = AutoConfig.for_model(**hf)
        except Exception as e:  # transformers validates the fields; report them as one line
            raise LdJaxError(f"invalid {model_type} config: {_one_line(e)}") from e
    if model_type == "gemma3":  # the multimodal wrapper: its text model
        hf = hf.get_text_config()
    return MODEL_TYPES[model_type].config_from_hf(hf)


def resolve(path_or_name: str | Path) -> Path:
    """A checkpoint directory, or a known model name (pulled into the cache if missing)."""
    from ld_jax.models import pull

    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if str(path_or_name) in pull.KNOWN:
        return Path(pull.pull(str(path_or_name)))
    raise LdJaxError(
        f"model directory not found: {path_or_name} (known names: {', '.join(sorted(pull.KNOWN))})"
    )


def read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise LdJaxError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise LdJaxError(f"{file}: unreadable JSON: {_one_line(e)}") from e
    return from_hf_config(data)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise LdJaxError(f"{index}: not a safetensors index: {_one_line(e)}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = [path / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LdJaxError(
            f"{path}: missing weight file(s) {', '.join(missing)} (only safetensors are read)"
        )
    return files


def _read_tensors(path: Path, renames: dict[str, str], wanted: set[str]) -> dict[str, np.ndarray]:
    """HF tensor name -> host array for the wanted names. numpy has no bfloat16, so those
    tensors come through safetensors' flax reader (as ml_dtypes.bfloat16 arrays)."""
    tensors = {}
    for file in _safetensors_files(path):
        try:
            with (
                safe_open(file, framework="numpy") as f,
                safe_open(file, framework="flax") as f_bf16,
            ):
                for stored in f.keys():
                    name = _rename(stored, renames)
                    if name in wanted:
                        bf16 = f.get_slice(stored).get_dtype() == "BF16"
                        tensors[name] = (
                            np.asarray(f_bf16.get_tensor(stored)) if bf16 else f.get_tensor(stored)
                        )
        except Exception as e:  # safetensors raises several types for a damaged file
            raise LdJaxError(
                f"{file}: corrupted or unreadable safetensors file: {_one_line(e)}"
            ) from e
    return tensors


def _rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def load_params(path: Path, config: ModelConfig, dtype: str = "float32") -> Params:
    """Read every tensor of the family's weight table, check its shape, stack the layers.

    Returns the nested-dict pytree (leaves jax arrays in `dtype`)."""
    entry = family(config.family)
    table = entry.weights(config)
    names = {}
    for leaf, (hf_name, _) in table.items():
        layers = range(config.n_layers) if leaf.startswith("layers/") else [None]
        names[leaf] = [hf_name.format(i=i) for i in layers]
    wanted = {n for ns in names.values() for n in ns}
    tensors = _read_tensors(path, entry.renames, wanted)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise LdJaxError(
            f"{path}: checkpoint lacks {len(missing)} expected tensor(s), e.g. {missing[0]}"
        )

    np_dtype = np.dtype(DTYPES[dtype])
    params: Params = {"layers": {}}
    for leaf, (_, shape_fields) in table.items():
        expected = tuple(getattr(config, f) for f in shape_fields)
        for name in names[leaf]:
            if tensors[name].shape != expected:
                raise LdJaxError(
                    f"{path}: tensor {name} has shape {tensors[name].shape}, expected {expected}"
                )
        if not leaf.startswith("layers/"):
            params[leaf] = jnp.asarray(tensors.pop(names[leaf][0]).astype(np_dtype, copy=False))
            continue
        stacked = np.stack([tensors.pop(n) for n in names[leaf]]).astype(np_dtype, copy=False)
        # torch Linear [out, in] -> [in, out]; transposing on the device is much faster than numpy.
        value = jnp.asarray(stacked)
        params["layers"][leaf[len("layers/") :]] = (
            jnp.swapaxes(value, 1, 2) if value.ndim == 3 else value
        )
    return params


def load_tokenizer(path: Path, config: ModelConfig):
    """`AutoTokenizer` from the directory, or None when it has no tokenizer files."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise LdJaxError(f"{path}: cannot load tokenizer: {_one_line(e)}") from e
    if len(tokenizer) > config.vocab_size:
        raise LdJaxError(
            f"{path}: tokenizer/model mismatch: tokenizer has {len(tokenizer)} tokens but the "
            f"embedding has only {config.vocab_size} rows"
        )
    return tokenizer


def describe(path_or_name: str) -> str:
    """A few lines on a checkpoint: family, sizes, parameter count, tokenizer."""
    path = resolve(path_or_name)
    config = read_config(path)
    n_params = 0
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="numpy") as f:
                n_params += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        except Exception as e:
            raise LdJaxError(
                f"{file}: corrupted or unreadable safetensors file: {_one_line(e)}"
            ) from e
    rows = [
        ("path", str(path)),
        ("family", f"{config.family} (model_type {config.model_type})"),
        ("parameters", f"{n_params / 1e6:.1f}M stored"),
        ("layers", f"{config.n_layers} x d_model {config.d_model}, d_ff {config.d_ff}"),
        ("attention", f"{config.n_heads} heads / {config.n_kv_heads} kv heads x {config.head_dim}"),
        ("vocab", f"{config.vocab_size} (tied embeddings: {config.tie_embeddings})"),
        (
            "sliding",
            f"window {config.sliding_window} on {config.layer_types.count('sliding')} layers",
        )
        if config.sliding_window
        else ("sliding", "none"),
        ("tokenizer", "yes" if any((path / f).is_file() for f in _TOKENIZER_FILES) else "none"),
    ]
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def save_param_tree(path: str | Path, params: Params) -> None:
    """Write a parameter pytree as safetensors in ld_jax's own layout ("/"-joined tree paths):
    for caching trained weights between runs, not a Hugging Face checkpoint."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(params)).items()},
        str(path),
    )


def load_param_tree(path: str | Path) -> Params:
    """The pytree that `save_param_tree` wrote."""
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file

    return unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v) for k, v in load_file(str(path)).items()}
    )
