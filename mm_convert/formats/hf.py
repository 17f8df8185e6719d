"""Hugging Face checkpoint directories: lazy reader and streaming safetensors writer.

The reader accepts a single ``model.safetensors`` or shards listed by ``model.safetensors.index.json``, in
any of the key schemes a model spec declares (``schemes``: name -> prefix renames onto the legacy names). It
exposes legacy names; ``scheme`` remembers which one was read so a writer can write the same back. Tensors
are read one at a time, sliced before reading.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from ..errors import CheckpointError, ConfigError, load_json_object
from .torch_stream import StreamedTensor
from ..manifest import check_sizes, open_output, read_manifest

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files beside the weights that describe the model and its inputs; mm_to_hf copies them from a reference dir.
NON_WEIGHT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                    "chat_template.json", "chat_template.jinja", "tokenizer.model")

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


Schemes = dict[str, tuple[tuple[str, str], ...]]  # scheme -> ((its prefix, legacy prefix), ...)


def scheme_of(key: str, schemes: Schemes) -> str:
    for name, pairs in schemes.items():
        if any(key.startswith(new) for new, _ in pairs):
            return name
    return "legacy"


def to_legacy(key: str, schemes: Schemes) -> str:
    for new, old in schemes.get(scheme_of(key, schemes), ()):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def from_legacy(key: str, scheme: str, schemes: Schemes) -> str:
    for new, old in schemes.get(scheme, ()):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_config(hf_dir: str | os.PathLike, option: str = "--cfg.hf_config.hf_dir") -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConfigError(f"{option} {hf_dir}: not a directory; expected a Hugging Face checkpoint directory")
    if not path.is_file():
        raise ConfigError(f"{path}: missing; expected the model's config.json in {option}")
    return load_json_object(path, ConfigError)


class HFReader:
    """Lazy access to the tensors of an HF directory under legacy names."""

    def __init__(self, hf_dir: str | os.PathLike, schemes: Schemes | None = None):
        self.root = Path(hf_dir)
        self.schemes = schemes or {}
        index = self.root / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e}); expected a 'weight_map' object")
        elif (self.root / SINGLE).is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.root}: no {SINGLE} or {INDEX}; expected a Hugging Face safetensors checkpoint")
        self._handles: dict[str, object] = {}
        self._layout: dict[str, tuple[int, dict]] = {}  # file -> (first data byte, header)
        self._file_of: dict[str, str] = {}  # legacy name -> file
        self._key_of: dict[str, str] = {}   # legacy name -> key in its file
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        check_sizes(self.root, read_manifest(self.root), files)  # written by mm_convert: sizes must match
        for fname in files:
            if not (self.root / fname).is_file():
                raise CheckpointError(f"{self.root / fname}: missing; {INDEX} lists it")
            keys = self._open(fname).keys()
            for k in keys:
                self._file_of[to_legacy(k, self.schemes)] = fname
                self._key_of[to_legacy(k, self.schemes)] = k
        if weight_map:
            for k, fname in weight_map.items():
                if self._file_of.get(to_legacy(k, self.schemes)) != fname:
                    raise CheckpointError(f"{self.root / fname}: has no tensor {k}, which {INDEX} places there")
        found = {scheme_of(k, self.schemes) for k in self._key_of.values()} - {"legacy"}
        self.scheme = found.pop() if len(found) == 1 else "legacy"
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:  # size first, so that a cut-short file is reported as truncated
                layout = _check_data_size(self.root / fname)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError):
                layout = None  # a malformed header: safe_open says what is wrong with it
            try:
                h = safe_open(str(self.root / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.root / fname}: not a readable safetensors file ({str(e).splitlines()[0]})")
            if layout is None:
                raise CheckpointError(f"{self.root / fname}: not a readable safetensors file (malformed header)")
            self._layout[fname] = layout
            self._handles[fname] = h
        return h

    def external(self, name: str) -> str:
        """A legacy name as this checkpoint spells it."""
        return from_legacy(name, self.scheme, self.schemes)

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        m = self._meta.get(name)
        if m is None:
            sl = self._open(self._file_of[name]).get_slice(self._key_of[name])
            dt = ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                raise CheckpointError(f"{self.root / self._file_of[name]}: {self._key_of[name]} has unsupported dtype {sl.get_dtype()}")
            m = self._meta[name] = (dt, tuple(sl.get_shape()))
        return m

    def read(self, name: str, start: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor, or the box ``start + shape`` of it; only the needed rows are read from disk."""
        h = self._open(self._file_of[name])
        full = self.meta(name)[1]
        try:
            if start is None or (all(s == 0 for s in start) and tuple(shape) == full):
                return h.get_tensor(self._key_of[name])
            sl = h.get_slice(self._key_of[name])
            return sl[tuple(slice(s, s + n) for s, n in zip(start, shape))]
        except Exception as e:
            raise CheckpointError(f"{self.root / self._file_of[name]}: cannot read {self._key_of[name]} ({str(e).splitlines()[0]})")

    def locate(self, name: str) -> tuple[str, int, torch.dtype, tuple[int, ...]]:
        """(file path, offset of the first byte, dtype, shape) of a tensor's contiguous row-major bytes,
        so that executors can read any row range with plain file reads."""
        fname = self._file_of[name]
        self._open(fname)
        start, header = self._layout[fname]
        dt, shape = self.meta(name)
        return str(self.root / fname), start + header[self._key_of[name]]["data_offsets"][0], dt, shape

    def weight_files(self) -> list[str]:
        return sorted(set(self._file_of.values()))


def _check_data_size(path: Path) -> tuple[int, dict]:
    """The header, fully validated before any tensor is read: a known dtype and a shape per tensor, data
    offsets holding exactly dtype x shape bytes, tensors tiling the data buffer with no gap and no overlap, and
    the file exactly as long as the header says (a cut-short file is reported as truncated)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    spans = []
    for key, v in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
        if dtype not in ST_DTYPES or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: header entry of {key} is malformed (dtype {dtype!r}, shape {shape!r}, "
                                  f"data_offsets {offsets!r})")
        need = _numel(shape) * ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{path}: header says {key} spans bytes {offsets[0]}-{offsets[1]} ({offsets[1] - offsets[0]}), "
                                  f"but {dtype} x {shape} needs {need}")
        spans.append((offsets[0], offsets[1], key))
    at = 0
    for lo, hi, key in sorted(spans):
        if lo != at:
            raise CheckpointError(f"{path}: header places {key} at byte {lo} of the data, expected {at} "
                                  f"({'a gap' if lo > at else 'an overlap with the tensor before'})")
        at = hi
    size = path.stat().st_size
    if size < 8 + n + at:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header needs {8 + n + at})")
    if size > 8 + n + at:
        raise CheckpointError(f"{path}: {size - 8 - n - at} bytes after the last tensor the header describes "
                              f"(expected {8 + n + at} bytes)")
    return 8 + n, header


# ---- writer ----------------------------------------------------------------------------------------------
def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[int], torch.Tensor], metadata: dict | None = None) -> int:
    """Write a safetensors file at ``path`` (not journaled: for files outside a command's output). Returns bytes
    written."""
    with open_output(path) as f:  # hashed as written, fsynced; removed on failure
        write_safetensors_to(f, entries, produce, metadata)
    return f.size


def write_safetensors_to(f, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                         produce: Callable[[int], torch.Tensor], metadata: dict | None = None) -> None:
    """Write a safetensors file into the open file ``f`` (``f.path``: its name) tensor by tensor: the header
    comes from (name, dtype, shape) alone, then ``produce(i)`` supplies tensor i, whose bytes are written and
    dropped."""
    path = f.path
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for i, (name, dtype, shape) in enumerate(entries):
        t = produce(i)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} came out as {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
        if isinstance(t, StreamedTensor):  # bytes in row blocks: never whole in memory
            n, start = _numel(shape) * dtype.itemsize, f.tell()
            for chunk in t.chunks():
                f.write(chunk)
            if f.tell() - start != n:
                raise CheckpointError(f"{path}: {name} came out as {f.tell() - start} bytes, planned {n}")
        else:
            write_tensor_bytes(f, t)


def write_tensor_bytes(f, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_index(path: str | os.PathLike, weight_map: dict[str, str], total_size: int) -> None:
    Path(path).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")


class SafetensorsWriter:
    """Writes one planned HF file: a safetensors file with one slot ("") of tensors; the index beside them."""

    zip_records = False  # no per-record CRC to compute while streaming

    def write(self, fh, slots: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]],
              produce: Callable[[str, int], torch.Tensor]) -> None:
        write_safetensors_to(fh, slots[""], lambda i: produce("", i))

    def finish(self, out_dir: Path, planned) -> None:
        """The index, once the planned files are written (when there are several)."""
        if len(planned) > 1:
            write_index(Path(out_dir) / INDEX, {t.key: f.path for f in planned for t in f.tensors},
                        sum(f.nbytes for f in planned))
