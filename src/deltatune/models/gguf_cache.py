"""GGUF → safetensors conversion cache.

transformers de-quantizes a GGUF file on every load (~20 s for SmolLM2, plus ~9 s to build its
tokenizer). We do it once and keep a plain HF directory (fp32 safetensors + tokenizer) under
``$DELTATUNE_CACHE/gguf/<stem>-<sha256 prefix>``. The key is the file's content hash, so a
changed file gets a new entry; entries are written atomically, so a half-written one never exists.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from deltatune.utils.errors import ModelLoadError, one_line
from deltatune.utils.io import atomic_dir

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_gguf(path: Path) -> str:
    """Validate the GGUF header and architecture before the slow conversion; return the architecture."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelLoadError(f"{path}: GGUF file has no 'general.architecture' field")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except ModelLoadError:
        raise
    except Exception as err:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise ModelLoadError(f"{path}: not a readable GGUF file (truncated or corrupt?): {one_line(err)}") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")
    return arch


def cache_entry(gguf_path: Path) -> Path:
    """Where the converted copy of ``gguf_path`` lives: keyed by the file's content hash."""
    gguf_path = Path(gguf_path).resolve()
    return cache_root() / "gguf" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"


def converted_dir(gguf_path: Path) -> Path:
    """The cached HF directory for ``gguf_path``, converting it on first use."""
    gguf_path = gguf_path.resolve()
    target = cache_entry(gguf_path)
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf_path)  # parsing the header takes seconds: only on a cache miss
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached at %s)", gguf_path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:
        raise ModelLoadError(f"{gguf_path}: transformers could not load this GGUF file: {one_line(err)}") from None
    # The weights are plain fp32 after de-quantization, but transformers still marks the model
    # as GGUF-quantized and refuses save_pretrained; drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(gguf_path)
    with atomic_dir(target, replace=False) as tmp:  # concurrent ranks: first one wins, others reuse it
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target
