"""Tensor-at-a-time reading of safetensors checkpoints.

A checkpoint is opened by reading only its header (names, dtypes, shapes, byte offsets), so every
input of a merge can be validated before a single tensor is read. Tensors are then read one at a
time with ``os.pread`` into fresh memory. Deliberately not through ``mmap`` (``safe_open``): pages
of a mapped file that were read stay counted in the process's resident set, so merging K
checkpoints through mmap shows K models in peak RSS even though each tensor is used once.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.utils.errors import ModelLoadError, one_line

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int     # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` from a safetensors file's header; no tensor data is read."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        start, end = meta["data_offsets"]
        infos[name] = TensorInfo(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + start, 8 + n + end)
    return infos


class TensorFile:
    """The tensors of one checkpoint (one file or the shards of an index), read on demand."""

    def __init__(self, files: list[Path], where: str):
        self.where = where
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            self.infos.update(read_header(file))
        self._fds: dict[Path, int] = {}

    def keys(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        size = info.end - info.start
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:  # pread may return fewer bytes than asked for large reads
            chunk = os.preadv(fd, [view[done:]], info.start + done)
            if chunk <= 0:
                raise ModelLoadError(f"{info.file}: file ends inside tensor {name!r}")
            done += chunk
        if size == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class MemoryTensors:
    """TensorFile's interface over tensors already in memory (an adapter converted on reading,
    e.g. a PEFT AdaLoRA file read as LoRA: adapters are small, so reading one whole is fine)."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.where, self.tensors = where, tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        pass


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a HF model directory (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({one_line(err)})") from None
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    hint = " (pytorch_model.bin is a pickle and is refused; re-save it with safe_serialization=True)" if (directory / "pytorch_model.bin").exists() else ""
    raise ModelLoadError(f"model directory {str(directory)!r} has no safetensors weights{hint}")
