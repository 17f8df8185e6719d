"""Stream-write torch's own checkpoint format, one tensor at a time.

``torch.save`` needs the whole object (every tensor) in memory before it
writes anything.  MindSpeed-MM / Megatron shards (``model_optim_rng.pt``)
can be larger than RAM, so this module writes the same file format record by
record: the pickle (``data.pkl``) is built from a structure in which tensors
are replaced by :class:`TensorSpec` placeholders, then each tensor is asked
for, written and dropped, in ``data.pkl`` order.

The result is laid out the way torch's own writer (miniz, as driven by
``caffe2/serialize/inline_container.cc``) lays it out, so that both
``torch.load(path, weights_only=True)`` and ``torch.load(path,
weights_only=True, mmap=True)`` accept it (torch >= 2.3):

* a zip archive whose records all live in ``<archive>/``, ``<archive>`` being
  the file name without its extension (what ``torch.save(obj, path)`` uses);
* records, in order: ``data.pkl``, ``.format_version`` ("1"),
  ``.storage_alignment`` ("64"), ``byteorder`` (e.g. "little"), ``data/0``,
  ``data/1``, ..., ``version`` ("3\\n"), ``.data/serialization_id``;
* every record stored (not compressed), its data starting on a 64-byte
  boundary: the local header carries an extra field ``"FB"`` + length + ``Z``
  padding (mmap loading and torch's storage-offset arithmetic rely on this);
* non-empty records are followed by a data descriptor (general purpose
  flag bit 3), empty ones are not; all dates are zero; UTF-8 flag set;
* zip64: a record whose size or local header offset is >= 0xFFFFFFFF gets a
  zip64 extra field (in the local header, before the padding, and in the
  central directory) and a 24-byte data descriptor; the archive always ends
  with a zip64 end-of-central-directory record + locator + the classic end
  record, exactly like torch's writer.

``data.pkl`` is pickle protocol 2.  A tensor is reduced through
``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, requires_grad,
OrderedDict())`` and its storage is the persistent id ``('storage',
torch.<Dtype>Storage, key, 'cpu', numel)``.  For contiguous tensors that own
their storage the bytes of ``data.pkl`` are identical to what ``torch.save``
writes for the same structure.

Public API: :class:`TensorSpec`, :func:`write_torch_file`,
:func:`read_torch_file`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import os
import pickle
import struct
import sys
from typing import Any, Callable

import torch

try:  # ISA-L's CRC-32 runs ~7x faster than zlib's; the same checksum
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

__all__ = ["TensorSpec", "StreamedTensor", "write_torch_file", "read_torch_file"]

# Path of a value inside the object given to write_torch_file: the dict keys
# and list/tuple indices leading to it, e.g. ("model", "decoder.final_norm.weight").
Path = tuple

_ALIGN = 64  # torch's kFieldAlignment / _get_storage_alignment()
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_CHUNK = 64 << 20  # bytes per crc/write step for tensor data
_PICKLE_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL

# dtype -> name of the legacy typed storage class torch pickles for it.
_STORAGE_NAMES = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
    torch.complex64: "ComplexFloatStorage",
    torch.complex128: "ComplexDoubleStorage",
}
for _dt, _nm in (
    ("float8_e5m2", "Float8_e5m2Storage"),
    ("float8_e4m3fn", "Float8_e4m3fnStorage"),
):
    if hasattr(torch, _dt) and hasattr(torch, _nm):
        _STORAGE_NAMES[getattr(torch, _dt)] = _nm


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Placeholder for a tensor that will be produced while the file is written.

    ``dtype`` and ``shape`` are what ``data.pkl`` records; the tensor later
    returned for it must match both.  ``key`` is free for the caller (e.g. the
    name of the source tensor); the writer only passes the spec back to
    ``produce`` and shows ``key`` in error messages.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    key: Any = None

    def __post_init__(self):
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"TensorSpec.dtype must be a torch.dtype, got {self.dtype!r}")
        shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"TensorSpec.shape has a negative size: {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


@dataclasses.dataclass
class StreamedTensor:
    """A tensor given as its bytes rather than in memory: ``chunks()`` yields bytes-like objects that,
    concatenated, are the tensor's contiguous row-major bytes (``produce`` may return one instead of a
    tensor, so a tensor larger than RAM can be written). Each chunk is written before the next is asked for."""

    dtype: torch.dtype
    shape: tuple
    chunks: Callable[[], Any]
    crc32: Callable[[], int] | None = None  # the bytes' CRC-32, computed by the producer; asked after the chunks


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Same as torch: sizes of 0 count as 1 (torch.empty(2, 0, 3).stride() == (3, 3, 1)).
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _storage_class(dtype: torch.dtype):
    name = _STORAGE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} is not supported by the torch stream writer")
    return getattr(torch, name)


def _fmt_path(path: Path) -> str:
    return "/".join(str(p) for p in path) if path else "<root>"


# --------------------------------------------------------------------------
# data.pkl


class _StorageRef:
    """Stands for storage ``key``; pickled as torch's persistent storage id."""

    __slots__ = ("pid",)

    def __init__(self, dtype: torch.dtype, key: str, numel: int):
        self.pid = ("storage", _storage_class(dtype), key, "cpu", numel)


@dataclasses.dataclass
class _Storage:
    key: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    spec: TensorSpec | None = None  # placeholder to produce ...
    tensor: torch.Tensor | None = None  # ... or a real tensor found in obj


_ATOMS = (str, int, float, bool, bytes, type(None))  # exact types only (no subclasses)


def _collect_paths(obj: Any) -> dict[int, Path]:
    """Check ``obj`` only holds what weights_only loading accepts and map
    id(tensor or TensorSpec) -> its first path."""
    paths: dict[int, Path] = {}
    active: set[int] = set()

    def walk(x: Any, path: Path) -> None:
        if isinstance(x, (TensorSpec, torch.Tensor)):
            if isinstance(x, torch.Tensor) and type(x) not in (torch.Tensor, torch.nn.Parameter):
                raise TypeError(f"{_fmt_path(path)}: tensor subclass {type(x).__name__} is not supported")
            paths.setdefault(id(x), path)
        elif type(x) in _ATOMS or isinstance(x, torch.dtype):
            pass
        elif type(x) is argparse.Namespace:  # Megatron's args: pickled as the class + its attributes
            walk(vars(x), path)
        elif isinstance(x, (dict, list, tuple)):
            if type(x) not in (dict, collections.OrderedDict, list, tuple):
                raise TypeError(f"{_fmt_path(path)}: {type(x).__name__} is not supported (use dict/list/tuple)")
            if id(x) in active:
                raise ValueError(f"{_fmt_path(path)}: object contains itself")
            active.add(id(x))
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in items:
                if isinstance(x, dict) and type(k) not in _ATOMS:
                    raise TypeError(f"{_fmt_path(path)}: dict key {k!r} is not a plain value")
                walk(v, path + (k,))
            active.discard(id(x))
        else:
            raise TypeError(
                f"{_fmt_path(path)}: {type(x).__name__} cannot be written "
                "(allowed: dict, list, tuple, str, int, float, bool, None, bytes, tensors, TensorSpec)"
            )

    walk(obj, ())
    return paths


class _Pickler(pickle.Pickler):
    """Pickles like torch.save, tensors/TensorSpecs becoming numbered storages."""

    def __init__(self, file, paths: dict[int, Path]):
        super().__init__(file, protocol=_PICKLE_PROTOCOL)
        self.paths = paths
        self.storages: list[_Storage] = []

    def persistent_id(self, obj):
        if type(obj) is _StorageRef:
            return obj.pid
        return None

    def reducer_override(self, obj):
        if isinstance(obj, TensorSpec):
            spec, tensor = obj, None
            dtype, shape, requires_grad = obj.dtype, obj.shape, False
        elif isinstance(obj, torch.Tensor):
            spec, tensor = None, obj
            dtype, shape, requires_grad = obj.dtype, tuple(obj.shape), bool(obj.requires_grad)
        else:
            return NotImplemented
        path = self.paths.get(id(obj), ())
        if dtype not in _STORAGE_NAMES:
            raise ValueError(f"{_fmt_path(path)}: dtype {dtype} is not supported by the torch stream writer")
        key = str(len(self.storages))
        numel = 1
        for s in shape:
            numel *= s
        self.storages.append(_Storage(key, path, dtype, shape, numel * _element_size(dtype), spec, tensor))
        args = (
            _StorageRef(dtype, key, numel),
            0,
            shape,
            _contiguous_stride(shape),
            requires_grad,
            collections.OrderedDict(),
        )
        return (torch._utils._rebuild_tensor_v2, args)


def _dump_pickle(obj: Any) -> tuple[bytes, list[_Storage]]:
    paths = _collect_paths(obj)
    buf = io.BytesIO()
    pickler = _Pickler(buf, paths)
    pickler.dump(obj)
    return buf.getvalue(), pickler.storages


# --------------------------------------------------------------------------
# zip container, laid out like torch's miniz writer


def _zip64_extra(size: int | None, offset: int | None) -> bytes:
    vals = ([size, size] if size is not None else []) + ([offset] if offset is not None else [])
    return struct.pack(f"<HH{len(vals)}Q", 0x0001, 8 * len(vals), *vals)


def _local_header(name: bytes, size: int, offset: int) -> bytes:
    """Local file header + name + extra fields, so that data starts 64-aligned."""
    big_size, big_ofs = size >= _U32, offset >= _U32
    z64 = _zip64_extra(size if big_size else None, offset if big_ofs else None) if (big_size or big_ofs) else b""
    start = offset + 30 + len(name) + len(z64) + 4
    pad = -start % _ALIGN
    extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    flags = 0x0800 | (0x0008 if size else 0)  # UTF-8 name; data descriptor when non-empty
    fixed = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra))
    return fixed + name + extra


class _ZipWriter:
    """Writes stored zip records to a binary file object, starting where it is."""

    def __init__(self, fh, archive: str):
        self.fh = fh
        self.prefix = archive + "/"
        self.pos = fh.tell()
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, offset, size, crc
        self._open: tuple[bytes, int, int] | None = None  # name, offset, size
        self._crc = 0
        self._written = 0

    def begin(self, name: str, size: int) -> None:
        assert self._open is None
        bname = (self.prefix + name).encode("utf-8")
        header = _local_header(bname, size, self.pos)
        self.fh.write(header)
        self._open = (bname, self.pos, size)
        self.pos += len(header)
        assert self.pos % _ALIGN == 0
        self._crc, self._written = 0, 0

    def write(self, data, crc: bool = True) -> None:
        mv = memoryview(data).cast("B")
        if crc:  # else the caller sets the record's CRC-32 (set_crc) before end()
            self._crc = crc32(mv, self._crc)
        self.fh.write(mv)
        self._written += len(mv)
        self.pos += len(mv)

    def set_crc(self, crc: int) -> None:
        self._crc = crc

    def end(self) -> None:
        bname, offset, size = self._open
        if self._written != size:
            raise RuntimeError(f"record {bname.decode()}: wrote {self._written} bytes, expected {size}")
        if size:
            if size >= _U32 or offset >= _U32:
                desc = struct.pack("<IIQQ", 0x08074B50, self._crc, size, size)
            else:
                desc = struct.pack("<IIII", 0x08074B50, self._crc, size, size)
            self.fh.write(desc)
            self.pos += len(desc)
        self.entries.append((bname, offset, size, self._crc))
        self._open = None

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        if data:
            self.write(data)
        self.end()

    def finish(self) -> None:
        cd_ofs = self.pos
        cd = bytearray()
        for bname, offset, size, crc in self.entries:
            big_size, big_ofs = size >= _U32, offset >= _U32
            z64 = _zip64_extra(size if big_size else None, offset if big_ofs else None) if (big_size or big_ofs) else b""
            flags = 0x0800 | (0x0008 if size else 0)
            cd += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50, 0, 0, flags, 0, 0, 0, crc,
                min(size, _U32), min(size, _U32),
                len(bname), len(z64), 0, 0, 0, 0, min(offset, _U32),
            )
            cd += bname + z64
        n = len(self.entries)
        eocd64_ofs = cd_ofs + len(cd)
        cd += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, len(cd), cd_ofs)
        cd += struct.pack("<IIQI", 0x07064B50, 0, eocd64_ofs, 1)
        cd += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(n, _U16), min(n, _U16),
            min(eocd64_ofs - cd_ofs, _U32), min(cd_ofs, _U32), 0,
        )
        self.fh.write(cd)
        self.pos += len(cd)

    def serialization_id(self) -> str:
        # torch: 20 digits hashing the record names + 20 digits combining the CRCs.
        names = hashlib.blake2b(b"\0".join(sorted(e[0] for e in self.entries)), digest_size=8)
        crcs = hashlib.blake2b(b"".join(struct.pack("<I", e[3]) for e in self.entries), digest_size=8)
        return f"{int.from_bytes(names.digest(), 'little'):020d}{int.from_bytes(crcs.digest(), 'little'):020d}"


def _archive_name(path) -> str:
    # torch.save(obj, path) names the archive after the file, minus extension.
    base = os.path.basename(os.fspath(path))
    stem = base[: base.rfind(".")] if "." in base else base
    return stem if stem and stem.isascii() else "archive"


# --------------------------------------------------------------------------
# writing


def _checked_tensor(t: Any, st: _Storage) -> torch.Tensor:
    where = _fmt_path(st.path)
    if st.spec is not None and st.spec.key is not None:
        where += f" (key {st.spec.key!r})"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: produce returned {type(t).__name__}, expected a torch.Tensor")
    if t.dtype != st.dtype or tuple(t.shape) != st.shape:
        raise ValueError(
            f"{where}: produced tensor is {t.dtype} {tuple(t.shape)}, expected {st.dtype} {st.shape}"
        )
    if t.device.type != "cpu":
        raise ValueError(f"{where}: tensor is on {t.device}, expected a CPU tensor")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{where}: only dense (strided) tensors can be written")
    return t


def _write_tensor_bytes(zw: _ZipWriter, t: torch.Tensor) -> None:
    # One contiguous copy at most (only when t is not contiguous), then a
    # zero-copy byte view of it, written in chunks.
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    mv = memoryview(flat.view(torch.uint8).numpy())
    for i in range(0, len(mv), _CHUNK):
        zw.write(mv[i : i + _CHUNK])


def _write_archive(
    zw: _ZipWriter,
    obj: Any,
    produce: Callable[[Path, TensorSpec], torch.Tensor] | None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write all records of ``obj`` and the central directory through ``zw``."""
    pkl, storages = _dump_pickle(obj)
    total = sum(st.nbytes for st in storages)
    zw.add("data.pkl", pkl)
    zw.add(".format_version", b"1")
    zw.add(".storage_alignment", str(_ALIGN).encode())
    zw.add("byteorder", sys.byteorder.encode())  # tensor bytes are written in native order
    done = 0
    for st in storages:
        if st.spec is not None:
            if produce is None:
                raise ValueError(f"{_fmt_path(st.path)}: TensorSpec found but no produce callback given")
            t = produce(st.path, st.spec)
            if not isinstance(t, StreamedTensor):
                t = _checked_tensor(t, st)
        else:
            t = _checked_tensor(st.tensor, st)
        if isinstance(t, StreamedTensor):
            if t.dtype != st.dtype or tuple(t.shape) != st.shape:
                raise ValueError(f"{_fmt_path(st.path)}: produced tensor is {t.dtype} {tuple(t.shape)}, "
                                 f"expected {st.dtype} {st.shape}")
            zw.begin(f"data/{st.key}", st.nbytes)
            for chunk in t.chunks():
                zw.write(chunk, crc=t.crc32 is None)
            if t.crc32 is not None:
                zw.set_crc(t.crc32())
        else:
            zw.begin(f"data/{st.key}", st.nbytes)
            _write_tensor_bytes(zw, t)
        zw.end()
        del t  # drop our reference before asking for the next tensor
        done += st.nbytes
        if progress is not None:
            progress(done, total)
    zw.add("version", b"3\n")
    zw.add(".data/serialization_id", zw.serialization_id().encode())
    zw.finish()


def write_torch_file(
    path,
    obj: Any,
    produce: Callable[[Path, TensorSpec], torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write ``obj`` to ``path`` in torch.save's zip format, streaming tensors.

    ``obj`` is a nested structure of dict (incl. OrderedDict) / list / tuple
    / str / int / float / bool / None / bytes whose tensors are either real
    CPU tensors (written as they are) or :class:`TensorSpec` placeholders.

    ``produce(path, spec) -> torch.Tensor`` is called once per placeholder, in
    ``data.pkl`` order (dict insertion order, depth first), with ``path`` the
    tuple of keys/indices leading to the placeholder (e.g. ``("model",
    "decoder.final_layernorm.weight")``) and ``spec`` the placeholder.  It must
    return a dense CPU tensor of exactly ``spec.dtype`` and ``spec.shape``
    (contiguous or not), else ``ValueError`` naming the path is raised.  The
    bytes are written at once and the writer keeps no reference to the tensor.
    The same TensorSpec object used twice is produced and stored once (the
    loaded structure then shares that tensor, as with torch.save).

    ``progress(done_bytes, total_bytes)`` (tensor data bytes) is called after
    each tensor.

    Returns the size of the file in bytes.  The file is flushed and fsynced;
    if anything fails it is removed.

    Differences from torch.save: every tensor gets its own compact,
    contiguous storage (views are not stored with their whole base storage,
    two tensors sharing memory are stored twice, strides are contiguous), and
    nn.Parameter is stored as a plain tensor.
    """
    path = os.fspath(path)
    try:
        with open(path, "wb") as fh:
            _write_archive(_ZipWriter(fh, _archive_name(path)), obj, produce, progress)
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------
# reading


def _first_line(msg: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    for ln in lines:  # torch's weights_only message hides the reason inside
        if ln.startswith("WeightsUnpickler error:"):
            line = ln[len("WeightsUnpickler error:"):].strip()
            break
    else:
        line = lines[0] if lines else type(msg).__name__
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_torch_file(path) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True, mmap=True)``.

    Raises a one-line ``ValueError`` naming the file if it is not a torch zip
    checkpoint, is truncated/corrupt, or cannot be loaded without running
    code (weights_only refusal).  A missing file raises FileNotFoundError.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        if magic[:1] == b"\x80":
            raise ValueError(f"{path}: legacy (non-zip) torch.save format, not a torch zip checkpoint")
        raise ValueError(f"{path}: not a torch zip checkpoint" + (" (empty file)" if not magic else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise ValueError(
                f"{path}: weights_only loading refused it, it needs code to unpickle ({_first_line(e)})"
            ) from None
        raise ValueError(f"{path}: corrupt torch checkpoint pickle ({_first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, struct.error) as e:
        raise ValueError(f"{path}: truncated or corrupt torch zip checkpoint ({_first_line(e)})") from None
