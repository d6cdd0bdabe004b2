"""Merged llama-family model → a GGUF file (f32 or f16), written with the ``gguf`` package.

Tensor names come from gguf's own HF → GGUF name map. llama.cpp stores the q/k projection rows
interleaved for its rotary kernel: ``convert_hf_to_gguf.py`` permutes them on the way in and
transformers' GGUF loader (``LlamaTensorProcessor``) un-permutes them on the way out, so
:func:`permute_qk` here is the exact inverse of that loader. 1-D tensors (norms) stay f32 in an
f16 file, as llama.cpp's converter does.

The tokenizer goes into the file's ``tokenizer.*`` metadata: copied verbatim from the source GGUF
when the model came from one, else built from a byte-level BPE ``tokenizer.json`` (gpt2 style).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deltatune.export.hf import base_of, merged_state_dict
from deltatune.utils.errors import ConfigError, DeltatuneError, ModelLoadError, one_line
from deltatune.utils.io import atomic_path

SUPPORTED = ("llama", "mistral")
FILE_TYPES = {"f32": 0, "f16": 1}  # gguf.LlamaFileType.ALL_F32 / MOSTLY_F16
# Token types in GGUF (gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows → llama.cpp's order: per head, ``[half0; half1]`` rows become interleaved pairs.

    ``weight``: [n_head · head_dim, in]. Plain equivalent:
    ``w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(w.shape)``.
    """
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_exportable(model: nn.Module) -> None:
    config = getattr(base_of(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ConfigError(f"GGUF export supports llama-family models ({', '.join(SUPPORTED)}); this model is {model_type!r} — export it with --to hf instead")
    if not type(base_of(model)).__name__.endswith("ForCausalLM"):
        raise ConfigError(f"GGUF export needs a causal LM (…ForCausalLM); got {type(base_of(model)).__name__}")


def export_gguf(model: nn.Module, out_path: str | Path, tokenizer=None, source_gguf: str | Path | None = None, dtype: str = "f32", name: str | None = None) -> Path:
    """Write ``model`` with its active deltas merged to ``out_path`` (atomically).

    Tokenizer metadata: from ``source_gguf``'s ``tokenizer.*`` fields when given, else from
    ``tokenizer`` (a fast byte-level BPE tokenizer). One of the two is required — a GGUF without
    a vocabulary cannot be run by llama.cpp.
    """
    import gguf

    if dtype not in FILE_TYPES:
        raise ConfigError(f"GGUF export dtype {dtype!r} is not supported; expected one of {', '.join(FILE_TYPES)}")
    check_exportable(model)
    if source_gguf is None and tokenizer is None:
        raise ConfigError("GGUF export needs the tokenizer: pass tokenizer= or the source GGUF file (source_gguf=)")
    config = base_of(model).config
    source_fields = _read_tokenizer_fields(Path(source_gguf)) if source_gguf is not None else None
    vocab_fields = None if source_fields is not None else _bpe_fields(tokenizer, config.vocab_size)
    out_path = Path(out_path)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with merged_state_dict(model) as state:
        tensors = []
        for key, value in state.items():
            if config.tie_word_embeddings and key == "lm_head.weight":
                continue  # llama.cpp uses token_embd for the output when output.weight is absent
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise DeltatuneError(f"tensor {key!r} has no GGUF name for a llama model; cannot export it")
            array = value.detach().to("cpu", torch.float32).numpy()
            if gguf_name.endswith("attn_q.weight"):
                array = permute_qk(array, n_head)
            elif gguf_name.endswith("attn_k.weight"):
                array = permute_qk(array, n_kv)
            tensors.append((gguf_name, array.astype(np.float16 if dtype == "f16" and array.ndim > 1 else np.float32)))
        with atomic_path(out_path) as tmp:
            writer = gguf.GGUFWriter(str(tmp), "llama")
            _add_hparams(writer, config, name or out_path.stem, FILE_TYPES[dtype])
            if source_fields is not None:
                for key, (value, vtype, sub_type) in source_fields.items():
                    writer.add_key_value(key, value, vtype, sub_type)
            else:
                for key, (value, vtype, sub_type) in vocab_fields.items():
                    writer.add_key_value(key, value, vtype, sub_type)
            for gguf_name, array in tensors:
                writer.add_tensor(gguf_name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    return out_path


def _add_hparams(writer, config, name: str, file_type: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(config, "rope_theta", None)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ConfigError(f"GGUF export: rope type {rope_type!r} is not supported (only plain RoPE); export with --to hf instead")


def _read_tokenizer_fields(path: Path) -> dict:
    """``{key: (value, type, sub_type)}`` for every ``tokenizer.*`` field of the GGUF at ``path``."""
    from gguf import GGUFReader, GGUFValueType

    if not path.is_file():
        raise ModelLoadError(f"source GGUF {str(path)!r} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {one_line(err)}") from None
    fields = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        fields[key] = (field.contents(), vtype, sub_type)
    if "tokenizer.ggml.tokens" not in fields:
        raise ModelLoadError(f"{path}: the source GGUF has no tokenizer.ggml.tokens; cannot copy its tokenizer")
    return fields


def _bpe_fields(tokenizer, vocab_size: int) -> dict:
    """GGUF tokenizer metadata for a fast byte-level BPE tokenizer (llama.cpp's ``gpt2`` model)."""
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        kind = spec.get("model", {}).get("type", type(tokenizer).__name__)
        raise ConfigError(f"GGUF export can build tokenizer metadata only for byte-level BPE tokenizers (got {kind!r}); pass the source GGUF to copy its tokenizer")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = spec["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    fields = {
        "tokenizer.ggml.model": ("gpt2", T.STRING, None),
        "tokenizer.ggml.pre": ("default", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
    }
    if merges:
        fields["tokenizer.ggml.merges"] = (merges, T.ARRAY, T.STRING)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            key = "padding" if role == "pad" else ("unknown" if role == "unk" else role)
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(token_id), T.UINT32, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = (template, T.STRING, None)
    # Whether the tokenizer adds BOS: read what it does rather than a config flag.
    ids = tokenizer("a")["input_ids"]
    fields["tokenizer.ggml.add_bos_token"] = (tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id, T.BOOL, None)
    return fields
