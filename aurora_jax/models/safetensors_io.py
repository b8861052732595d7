"""Reading and writing the safetensors format, one tensor at a time.

A small reader of our own rather than `safetensors.safe_open`: it memory-maps the file (so a
tensor is read only when asked for, and bfloat16/float8 come back as ml_dtypes arrays without a
float32 detour), and it checks the header against the file size, so a truncated download is
reported by name before any weight is placed. Format: 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from aurora_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy view of one .safetensors file; `get(name)` returns a read-only numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file (header says {n} bytes, "
                    f"file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file ({size} bytes, tensors need "
                f"{self._data_start + end}); re-download or re-save it")
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        mm = self._mmap
        begin, end = e["data_offsets"]
        raw = mm[self._data_start + begin: self._data_start + end]
        arr = raw.view(_DTYPES[e["dtype"]])
        if arr.size != int(np.prod(e["shape"], dtype=np.int64)):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} holds {arr.size} values, shape says {e['shape']}")
        return arr.reshape(e["shape"])


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes (name, host array) pairs to one file, atomically (through a temporary file).

    Everything passed is held in host memory at once, so callers pass one shard's worth."""
    items = [(name, np.ascontiguousarray(arr)) for name, arr in tensors]
    header: dict[str, dict] = {}
    offset = 0
    for name, arr in items:
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot write dtype {arr.dtype} of tensor {name!r}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(arr.tobytes())
    tmp.replace(path)
