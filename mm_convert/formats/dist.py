"""Megatron's ``torch_dist`` checkpoints (torch.distributed.checkpoint, DCP), read and written without Megatron.

    <iteration dir>/metadata.json   {"sharded_backend": "torch_dist", ...}
    <iteration dir>/common.pt       torch.save of what every rank shares (args, iteration; {} when converted)
    <iteration dir>/.metadata       pickled DCP Metadata: per key the global shape, dtype and chunks
                                    (offsets, sizes), and where each chunk's bytes are (file, offset, length)
    <iteration dir>/__R_K.distcp    chunk records, each a small torch.save zip of one tensor

Keys are global and layout-free: a TP-split tensor is stored as its TP=1 whole (chunks per rank), and the
layers of a TransformerBlock are stacked: ``<block>.layers.<name>`` has a leading layer axis (chunks per layer).
So a torch_dist checkpoint reads as an MM checkpoint at tp 1, pp 1 (one virtual shard, ``<block>.layers.<i>.``
keys), and the planner maps it through the same spec. Tensor bytes are read with plain reads from the chunk
records, never whole; ``.metadata`` and ``common.pt`` go through the safe unpickler.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import CheckpointError
from . import safe_pickle
from .torch_stream import _STORAGE_NAMES, StreamedTensor, TensorSpec, _write_archive, _ZipWriter

if TYPE_CHECKING:
    from ..plan import Ref

META_JSON = "metadata.json"
DCP_METADATA = ".metadata"
COMMON = "common.pt"
FILE_BYTES = 5 * 10**9  # records per .distcp file, at most (one file per writer process)
_STACKED = re.compile(r"^(.*\.layers\.)(?!\d+\.)(.+)$")  # "<block>.layers.<name>", name not starting with a number
_VIRTUAL = re.compile(r"^(.*\.layers\.)(\d+)\.(.+)$")
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Megatron names a layer's norms after the TransformerEngine linear they fuse into, whatever the layer spec
# (megatron-core's local spec maps them the same way), so checkpoints are interchangeable between specs
_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
              "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _to_dist_name(name: str) -> str:
    for ours, theirs in _NORM_KEYS.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def _from_dist_name(name: str) -> str:
    for ours, theirs in _NORM_KEYS.items():
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def is_dist_dir(path: Path) -> bool:
    meta = path / META_JSON
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("sharded_backend") == "torch_dist"
    except (ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a global tensor: its box and where its contiguous bytes are."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: str
    data_offset: int


@dataclass(frozen=True)
class GlobalTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def _fields(obj, where: str) -> dict:
    if isinstance(obj, safe_pickle.Saved):
        return obj.fields()
    raise CheckpointError(f"{where}: expected a DCP metadata record, found {type(obj).__name__}")


def read_metadata(it_dir: Path) -> dict[str, GlobalTensor]:
    """The tensors of a torch_dist directory (byte ranges checked), from its ``.metadata``."""
    return _join_glu_halves(read_tensors(it_dir))


def read_tensors(it_dir: Path, keep: Callable[[str], bool] | None = None) -> dict[str, GlobalTensor]:
    """The tensor entries of any DCP directory's ``.metadata``, as stored (keys, shapes and chunks; each chunk's
    bytes located inside its record and checked): those whose key ``keep`` accepts (default: all)."""
    path = it_dir / DCP_METADATA
    try:
        with open(path, "rb") as fh:
            meta = safe_pickle.SafeUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a torch_dist / DCP checkpoint directory needs its DCP metadata")
    except safe_pickle.UnsafeGlobal as e:
        raise CheckpointError(f"{path}: refused, its pickle names {e.dotted}, which is not DCP metadata (nothing was run)")
    except Exception as e:
        raise CheckpointError(f"{path}: not readable DCP metadata ({type(e).__name__}: {str(e)[:160]})")
    fields = _fields(meta, str(path))
    where: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for index, info in (fields.get("storage_data") or {}).items():
        i, s = _fields(index, str(path)), _fields(info, str(path))
        if s.get("transform_descriptors"):
            raise CheckpointError(f"{path}: {i['fqn']} is stored through stream transforms "
                                  f"{list(s['transform_descriptors'])} (compression); only plain records are read")
        if i.get("offset") is not None:
            where[(i["fqn"], tuple(i["offset"]))] = (s["relative_path"], int(s["offset"]), int(s["length"]))
    out = {}
    for key, md in (fields.get("state_dict_metadata") or {}).items():
        f = _fields(md, str(path))
        if "chunks" not in f or (keep is not None and not keep(key)):
            continue  # BytesStorageMetadata: _extra_state and other non-tensor entries; entries not asked for
        props = f.get("properties")
        state = props.state if isinstance(props, safe_pickle.Saved) else None
        dtype = state[0] if isinstance(state, tuple) and state else props.fields().get("dtype") if props else None
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{path}: {key} has no dtype in its properties")
        chunks = []
        for c in f["chunks"]:
            cf = _fields(c, str(path))
            offsets, sizes = tuple(map(int, cf["offsets"])), tuple(map(int, cf["sizes"]))
            if (key, offsets) not in where:
                raise CheckpointError(f"{path}: {key} chunk at {list(offsets)} has no storage entry")
            rel, start, length = where[(key, offsets)]
            chunks.append(Chunk(offsets, sizes, str(it_dir / rel), _record_data_offset(it_dir / rel, start, length,
                                                                                      key, dtype, sizes)))
        out[key] = GlobalTensor(key, dtype, tuple(map(int, f["size"])), tuple(chunks))
    return out


def _join_glu_halves(tensors: dict[str, GlobalTensor]) -> dict[str, GlobalTensor]:
    """Megatron's ``singleton_local_shards`` option stores a gated fc1 as ``<name>_w`` (gate) and ``<name>_v``
    (up); joined here into ``<name>`` = [gate; up] along the output rows, as the other saves store it."""
    out = dict(tensors)
    for key, w in tensors.items():
        v = tensors.get(key[:-2] + "_v")
        if not key.endswith("_w") or v is None or v.shape != w.shape or v.dtype != w.dtype:
            continue
        axis = 1 if _STACKED.match(key) else 0
        shift = lambda c: Chunk(c.offsets[:axis] + (c.offsets[axis] + w.shape[axis],) + c.offsets[axis + 1:],
                                c.sizes, c.path, c.data_offset)
        shape = w.shape[:axis] + (2 * w.shape[axis],) + w.shape[axis + 1:]
        out[key[:-2]] = GlobalTensor(key[:-2], w.dtype, shape, w.chunks + tuple(map(shift, v.chunks)))
        del out[key], out[key[:-2] + "_v"]
    return out


class _Slice(io.RawIOBase):
    """A read-only window [start, start + length) of a file, as its own file (zipfile reads one record)."""

    def __init__(self, fh, start: int, length: int):
        self.fh, self.start, self.length, self.pos = fh, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


_STORAGE_DTYPES = {name: dtype for dtype, name in _STORAGE_NAMES.items()}


class _TensorLayout(safe_pickle.SafeUnpickler):
    """Unpickles a chunk record's data.pkl into (storage key, dtype, storage offset, size, stride): no data."""

    def persistent_load(self, pid):
        _, storage, key, _location, numel = pid
        return ("storage", storage, str(key), int(numel))

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            dtype = _STORAGE_DTYPES.get(name)
            if dtype is None:
                raise safe_pickle.UnsafeGlobal(f"{module}.{name}")
            return dtype
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return lambda storage, offset, size, stride, *rest: (storage, int(offset), tuple(size), tuple(stride))
        return super().find_class(module, name)


def _record_data_offset(path: Path, start: int, length: int, key: str, dtype: torch.dtype, sizes) -> int:
    """Absolute offset of a chunk's tensor bytes inside its record (a torch.save zip at [start, start+length))."""
    where = f"{path}: chunk of {key} at byte {start}"
    try:
        with open(path, "rb") as fh:
            window = _Slice(fh, start, length)
            with zipfile.ZipFile(io.BufferedReader(window)) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                storage, offset, size, stride = _TensorLayout(io.BytesIO(z.read(pkl))).load()
                _, sdtype, skey, numel = storage
                info = z.getinfo(pkl[: -len("data.pkl")] + f"data/{skey}")
                fh.seek(start + info.header_offset)
                head = fh.read(30)
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                data = start + info.header_offset + 30 + name_len + extra_len
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: not a readable tensor record ({type(e).__name__}: {str(e)[:120]})")
    contiguous = tuple(int(prod(size[i + 1:])) for i in range(len(size)))
    if sdtype != dtype or tuple(size) != tuple(sizes) or (prod(size) > 1 and tuple(stride) != contiguous):
        raise CheckpointError(f"{where}: holds {sdtype} {list(size)} (stride {list(stride)}), the metadata says "
                              f"{dtype} {list(sizes)} contiguous")
    if info.compress_type != zipfile.ZIP_STORED or (offset + prod(size)) * dtype.itemsize > info.file_size \
            or data + info.file_size > start + length:
        raise CheckpointError(f"{where}: tensor bytes outside its record (compressed or truncated)")
    return data + offset * dtype.itemsize


def read_box(g: GlobalTensor, lo: tuple[int, ...], size: tuple[int, ...], where) -> torch.Tensor:
    """The box ``lo + size`` of a global tensor, gathered from the chunks that overlap it (each chunk's bytes
    mapped for the copy of its part only); ``where`` names the directory in errors."""
    out = np.empty(size, _RAW[g.dtype.itemsize])
    covered = 0
    for c in g.chunks:
        a = [max(l, o) for l, o in zip(lo, c.offsets)]
        b = [min(l + s, o + n) for l, s, o, n in zip(lo, size, c.offsets, c.sizes)]
        if any(x >= y for x, y in zip(a, b)):
            continue
        arr = np.memmap(c.path, _RAW[g.dtype.itemsize], "r", c.data_offset, c.sizes)
        src = arr[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c.offsets))]
        out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = src
        covered += prod(y - x for x, y in zip(a, b))
        del arr
    if covered != prod(size):
        raise CheckpointError(f"{where}: {g.key}: its chunks cover {covered} of the {prod(size)} "
                              f"elements asked for (box at {list(lo)}, size {list(size)})")
    return torch.from_numpy(out).view(g.dtype)


def locate_box(g: GlobalTensor, lo: tuple[int, ...], size: tuple[int, ...]) -> tuple[str, int] | None:
    """(file, offset) of the box ``lo + size`` (whole trailing axes) where one chunk holds it contiguous, else None."""
    for c in g.chunks:
        if tuple(c.sizes[1:]) == tuple(size[1:]) and all(o == 0 for o in c.offsets[1:]) \
                and c.offsets[0] <= lo[0] and lo[0] + size[0] <= c.offsets[0] + c.sizes[0]:
            row = prod(c.sizes[1:]) * g.dtype.itemsize
            return c.path, c.data_offset + (lo[0] - c.offsets[0]) * row
    return None


class DistReader:
    """A torch_dist directory read as an MM checkpoint at tp 1, pp 1: one virtual shard, slot ``model``."""

    tp_size = pp_size = 1
    layout_free = True  # the files hold global tensors: no TP / PP layout to read off or to check

    def __init__(self, it_dir: Path):
        self.iter_dir = it_dir
        self.tensors = read_metadata(it_dir)
        self.virtual: dict[str, tuple[GlobalTensor, int | None]] = {}  # virtual key -> (global, layer or None)
        for key, g in self.tensors.items():
            m = _STACKED.match(key)
            per_layer = _VIRTUAL.match(key)  # unstacked (singleton_local_shards): "<block>.layers.<i>.<name>"
            if m and len(g.shape) >= 1:
                for i in range(g.shape[0]):
                    self.virtual[f"{m.group(1)}{i}.{_from_dist_name(m.group(2))}"] = (g, i)
            elif per_layer:
                self.virtual[f"{per_layer.group(1)}{per_layer.group(2)}.{_from_dist_name(per_layer.group(3))}"] = (g, None)
            else:
                self.virtual[key] = (g, None)
        if not self.virtual:
            raise CheckpointError(f"{it_dir / DCP_METADATA}: no tensors")
        self._meta = {k: torch.empty(self._shape(k), dtype=g.dtype, device="meta") for k, (g, _) in self.virtual.items()}

    def _shape(self, key: str) -> tuple[int, ...]:
        g, layer = self.virtual[key]
        return g.shape[1:] if layer is not None else g.shape

    def files(self) -> list[str]:
        """The directory's files, relative to it (for sizes and identity)."""
        return sorted({os.path.relpath(c.path, self.iter_dir) for g in self.tensors.values() for c in g.chunks}
                      | {DCP_METADATA, META_JSON} | {n for n in (COMMON, OBJECTS) if (self.iter_dir / n).is_file()})

    def slots(self, rel: str) -> dict[str, dict[str, torch.Tensor]]:
        """{"model": {virtual key: meta tensor (shape and dtype only)}}."""
        return {"model": self._meta}

    def training_state(self) -> dict:
        common = self.iter_dir / COMMON
        if not common.is_file():
            return {}
        obj = safe_pickle.load(common, mmap=False)
        out = {}
        if isinstance(obj, dict) and type(obj.get("iteration")) is int:
            out["iteration"] = obj["iteration"]
        if isinstance(obj, dict) and isinstance(obj.get("args"), safe_pickle.SavedNamespace):
            out["args"] = obj["args"].to_namespace()
        return out

    def meta(self, ref: Ref) -> tuple[torch.dtype, tuple[int, ...]]:
        g, _ = self._global(ref)
        return g.dtype, self._shape(ref.key)

    def _global(self, ref: Ref):
        try:
            return self.virtual[ref.key]
        except KeyError:
            raise CheckpointError(f"{self.iter_dir}: no tensor {ref.key} in this torch_dist checkpoint")

    def _box(self, ref: Ref, start, shape) -> tuple[GlobalTensor, tuple[int, ...], tuple[int, ...]]:
        g, layer = self._global(ref)
        full = self._shape(ref.key)
        start = tuple(start) if start is not None else (0,) * len(full)
        shape = tuple(shape) if shape is not None else full
        if layer is not None:
            return g, (layer,) + start, (1,) + shape
        return g, start, shape

    def read(self, ref: Ref, start=None, shape=None) -> torch.Tensor:
        """A box of a virtual tensor, gathered from the chunks that overlap it (plain reads, no mmap)."""
        g, lo, size = self._box(ref, start, shape)
        t = read_box(g, lo, size, self.iter_dir)
        return t.reshape(size[1:]) if self.virtual[ref.key][1] is not None else t

    def locate(self, ref: Ref):
        """(file, offset, dtype, shape) where one chunk holds the virtual tensor whole and contiguous, else None."""
        g, lo, size = self._box(ref, None, None)
        where = locate_box(g, lo, size)
        return (*where, g.dtype, self._shape(ref.key)) if where is not None else None


# ---- writing ------------------------------------------------------------------------------------------------
def global_key(key: str) -> tuple[str, int | None]:
    """The torch_dist key of an MM tensor and its layer (``<block>.layers.<i>.<name>`` -> stacked key, i)."""
    m = _VIRTUAL.match(key)
    return (m.group(1) + _to_dist_name(m.group(3)), int(m.group(2))) if m else (key, None)


def _record_shape(shape, layer) -> tuple[int, ...]:
    return (1,) + tuple(shape) if layer is not None else tuple(shape)


class _Counter:
    def __init__(self):
        self.n = 0

    def write(self, b):
        self.n += len(memoryview(b).cast("B"))

    def tell(self):
        return self.n


class _Relative:
    """A file seen from ``base``: zip offsets inside a record count from the record's start."""

    def __init__(self, fh, base: int):
        self.fh, self.base = fh, base

    def write(self, b):
        return self.fh.write(b)

    def tell(self):
        return self.fh.tell() - self.base


_ZEROS = memoryview(bytes(1 << 20))


def _zeros(nbytes: int):
    for i in range(0, nbytes, len(_ZEROS)):
        yield _ZEROS[: min(len(_ZEROS), nbytes - i)]


def record_length(dtype: torch.dtype, shape) -> int:
    """Bytes of one chunk record holding a tensor of ``dtype`` and ``shape`` (what write_records writes)."""
    sink = _Counter()
    nbytes = prod(shape) * dtype.itemsize
    _write_archive(_ZipWriter(sink, "archive"), TensorSpec(dtype, tuple(shape)),
                   lambda p, s: StreamedTensor(dtype, tuple(shape), lambda: _zeros(nbytes), lambda: 0))
    return sink.n


def write_records(fh, entries, produce) -> None:
    """Chunk records, one per MM tensor in ``entries`` (key, dtype, shape), each a torch.save zip of the tensor
    (with a leading layer axis of 1 for a layer's tensor), streamed from ``produce(i)``."""
    write_tensor_records(fh, [(dtype, _record_shape(shape, global_key(key)[1])) for key, dtype, shape in entries],
                         produce)


def write_tensor_records(fh, records: list[tuple[torch.dtype, tuple[int, ...]]], produce) -> None:
    """One record per (dtype, record shape), each a torch.save zip of one tensor (what DCP's FileSystemWriter
    writes per chunk), streamed from ``produce(i)`` (same elements, viewed in the record's shape)."""
    for i, (dtype, rshape) in enumerate(records):
        rshape = tuple(rshape)

        def stream(p, s, i=i, rshape=rshape):
            t = produce(i)
            if isinstance(t, StreamedTensor):
                return StreamedTensor(t.dtype, rshape, t.chunks, t.crc32)
            return t.reshape(rshape)
        _write_archive(_ZipWriter(_Relative(fh, fh.tell()), "archive"), TensorSpec(dtype, rshape), stream)


def dcp_metadata(files: list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]],
                 objects: list[tuple[str, bytes]]) -> bytes:
    """The pickled DCP ``Metadata`` for records written by write_records into ``files`` [(file name, entries)]
    and the byte records ``objects`` [(key, bytes)] written in that order into OBJECTS: global shapes (layers
    stacked), one chunk per record, and each record's byte range."""
    chunks = []
    for name, entries in files:
        pos = 0
        for key, dtype, shape in entries:
            gkey, layer = global_key(key)
            rshape = _record_shape(shape, layer)
            length = record_length(dtype, rshape)
            chunks.append((gkey, ((layer or 0,) + (0,) * (len(rshape) - 1)) if rshape else (), rshape, name, pos, length))
            pos += length
    placed, pos = [], 0
    for key, data in objects:
        placed.append((key, OBJECTS, pos, len(data)))
        pos += len(data)
    return build_metadata({k: (g.dtype, g.shape) for k, g in _global_shapes(files).items()}, chunks, placed)


def build_metadata(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], chunks, objects,
                   planner_data: dict | None = None) -> bytes:
    """A pickled DCP ``Metadata``: ``tensors`` {key: (dtype, global shape)}; ``chunks`` [(key, offsets, sizes,
    file, position, length)], one per tensor record; ``objects`` [(key, file, position, length)], the byte
    records; ``planner_data`` {key: path in the nested state dict} (how DCP's loaders unflatten the keys)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)
    per_key: dict[str, list] = {}
    storage = {}
    for key, offsets, sizes, name, pos, length in chunks:
        at = torch.Size(tuple(offsets))
        per_key.setdefault(key, []).append(ChunkStorageMetadata(at, torch.Size(tuple(sizes))))
        storage[MetadataIndex(key, at)] = _StorageInfo(name, pos, length)
    sd_meta = {k: TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(tuple(shape)),
                                        sorted(per_key[k], key=lambda c: tuple(c.offsets)))
               for k, (dtype, shape) in tensors.items()}
    for key, name, pos, length in objects:
        sd_meta[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(name, pos, length)
    return pickle.dumps(Metadata(state_dict_metadata=sd_meta, planner_data=planner_data, storage_data=storage))


OBJECTS = "__objects.distcp"  # the byte records of non-tensor entries (layers' _extra_state)


def extra_state_objects(tensors: dict[str, GlobalTensor]) -> list[tuple[str, bytes]]:
    """Megatron keeps an ``_extra_state`` object per linear module of every layer (TransformerEngine's FP8
    metadata; None otherwise), sharded over the layer axis as ``<module>._extra_state/shard_<i>_<layers>``;
    its loader asks for them. Written as ``torch.save([None])``, what a layer without FP8 state saves."""
    buf = io.BytesIO()
    torch.save([None], buf)  # megatron stores a list: one object per local shard
    out = []
    for key, g in tensors.items():
        module = key[: -len("weight")] if key.endswith(".weight") else None
        if _STACKED.match(key) and module and module.rsplit(".", 2)[-2].startswith("linear_"):
            layers = g.shape[0]
            out += [(f"{module}_extra_state/shard_{i}_{layers}", buf.getvalue()) for i in range(layers)]
    return out


def write_side_files(it_dir: Path, files, common: dict | None = None) -> None:
    """``.metadata``, the extra-state records, ``metadata.json`` and ``common.pt`` beside the tensor records
    (after they are written)."""
    objects = extra_state_objects(_global_shapes(files))
    with open(it_dir / OBJECTS, "wb") as fh:
        for _, data in objects:
            fh.write(data)
    (it_dir / DCP_METADATA).write_bytes(dcp_metadata(files, objects))
    (it_dir / META_JSON).write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                "common_backend": "torch", "common_backend_version": 1}))
    torch.save(common or {}, it_dir / COMMON)


def _global_shapes(files) -> dict[str, GlobalTensor]:
    """Global key -> dtype and shape (layers stacked) of the MM tensors in ``files`` [(file name, entries)]."""
    out: dict[str, GlobalTensor] = {}
    for _, entries in files:
        for key, dtype, shape in entries:
            gkey, layer = global_key(key)
            if layer is None:
                out[gkey] = GlobalTensor(gkey, dtype, tuple(shape), ())
            else:
                layers = max(out[gkey].shape[0] if gkey in out else 0, layer + 1)
                out[gkey] = GlobalTensor(gkey, dtype, (layers,) + tuple(shape), ())
    return out


def record_file_name(k: int) -> str:
    """The K-th record file of a checkpoint written by one rank: ``__K_0.distcp``."""
    return f"__{k}_0.distcp"


class DistWriter:
    """Writes one planned file of a torch_dist output: chunk records (no CRC to compute while streaming;
    each record is a small zip whose own CRC the record writer computes); ``common``: what common.pt holds."""

    zip_records = False

    def __init__(self, common: dict | None = None):
        self.common = common or {}

    def write(self, fh, slots, produce) -> None:
        write_records(fh, slots["model"], lambda i: produce("model", i))

    def finish(self, it_dir: Path, planned) -> None:
        """The side files, once the planned record files are written."""
        write_side_files(it_dir, [(f.path, [(t.key, t.dtype, t.shape) for t in f.slots["model"]]) for f in planned],
                         self.common)
