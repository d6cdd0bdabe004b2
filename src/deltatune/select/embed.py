"""Sentence embeddings for selection: any encoder by name, mean pooling, cached on disk.

``embed(texts)`` returns ``E`` [n, d] float32 with unit rows::

    h = encoder(input_ids, attention_mask).last_hidden_state          # [b, T, d]
    e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)      # mean over real tokens
    e = e / ||e||                                                      # cosine = dot product

The default encoder is MiniLM-L6 (``deltatune.load_model("minilm-l6", task="encoder")``, the
sentence-transformers all-MiniLM-L6-v2 weights, which are trained for exactly this pooling).

Cache: ``<cache_dir>/<key>.safetensors`` where ``key`` hashes the encoder (name, resolved
source, its config and weight files' sizes and mtimes), ``max_length``, ``dtype``, the pooling, and the
content of the file as read (sha256 over the texts). A second run on the same file and
encoder reads the tensor back instead of running the encoder; any edit to the file or the
model gives a new key. Writes are atomic, so an interrupted run leaves no partial entry.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from deltatune.select.config import EmbeddingSection
from deltatune.utils.io import atomic_path

POOLING = "mean-l2"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune")) / "embeddings"


def texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] != ["a", "bc"]
        h.update(data)
    return h.hexdigest()


def model_fingerprint(name: str) -> str:
    """Name + resolved source + config/weight file sizes and mtimes (cheap; no weight hashing)."""
    from deltatune.models.load import resolve_source

    source, local = resolve_source(name)
    parts = [name, source]
    if local:
        for f in sorted(Path(source).iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


class TextEmbedder:
    """Embeds texts with one encoder; ``computed`` counts texts actually run through it."""

    def __init__(self, config: EmbeddingSection = EmbeddingSection(), progress: bool = True):
        self.config = config
        self.progress = progress
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.computed = 0
        self._model = None
        self._tokenizer = None

    def cache_path(self, texts: list[str]) -> Path:
        key = hashlib.sha256(f"{model_fingerprint(self.config.model)}|{self.config.max_length}|{self.config.dtype}|{POOLING}|{texts_sha256(texts)}".encode()).hexdigest()
        return self.cache_dir / f"{key[:32]}.safetensors"

    def embed(self, texts: list[str], desc: str = "embed") -> torch.Tensor:
        """``[len(texts), d]`` float32 unit rows, from the cache when possible."""
        path = self.cache_path(texts)
        if path.is_file():
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(texts):
                return emb
        emb = self._encode(texts, desc)
        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"model": self.config.model, "n": str(len(texts)), "pooling": POOLING})
        return emb

    def _load(self) -> None:
        if self._model is None:
            import deltatune

            self._model = deltatune.load_model(self.config.model, task="encoder", dtype=getattr(torch, self.config.dtype))
            self._tokenizer = deltatune.load_tokenizer(self.config.model)

    @torch.inference_mode()
    def _encode(self, texts: list[str], desc: str) -> torch.Tensor:
        self._load()
        threads = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        # Longest first, batched by length: little padding, and the first batch shows the worst memory.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: torch.Tensor | None = None
        bs = self.config.batch_size
        try:
            with tqdm(total=len(texts), desc=desc, unit="text", disable=not self.progress) as bar:
                for start in range(0, len(order), bs):
                    idx = order[start:start + bs]
                    enc = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt")
                    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                    hidden = self._model(**inputs).last_hidden_state.float()
                    mask = enc["attention_mask"].unsqueeze(-1).float()
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                    if out is None:
                        out = torch.empty(len(texts), pooled.shape[1])
                    out[torch.tensor(idx)] = pooled
                    self.computed += len(idx)
                    bar.update(len(idx))
        finally:
            torch.set_num_threads(threads)
        return out
