"""Source integrity at streaming speed: every MM shard is torch's zip format, which stores a CRC-32 per record
(one record per tensor storage). The executor logs the CRC of every byte range it reads from a shard (it has the
bytes in hand); after the conversion, the ranges of each record are combined (``crc32_combine``, in offset
order) and compared with the stored CRC. Bytes of a record that were read otherwise (through the reader) are
read once more for the check, and so are the small records (the pickle naming tensors and shapes); tensor
records nothing was read from are not passed on and are not checked (``verify`` checks whole files against
the manifest's sha256).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field

from .errors import CheckpointError

try:
    from isal.isal_zlib import crc32, crc32_combine
except ImportError:  # the slow path: zlib's crc32 and the combine below
    from zlib import crc32

    def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
        """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's algorithm: GF(2) matrix powers)."""
        def times(mat, vec):
            out, i = 0, 0
            while vec:
                if vec & 1:
                    out ^= mat[i]
                vec >>= 1
                i += 1
            return out

        def square(mat):
            return [times(mat, mat[n]) for n in range(32)]

        if len2 <= 0:
            return crc1
        odd = [0xEDB88320] + [1 << n for n in range(31)]
        even = square(odd)
        odd = square(even)
        while True:
            even = square(odd)
            if len2 & 1:
                crc1 = times(even, crc1)
            len2 >>= 1
            if not len2:
                break
            odd = square(even)
            if len2 & 1:
                crc1 = times(odd, crc1)
            len2 >>= 1
            if not len2:
                break
        return crc1 ^ crc2


@dataclass(frozen=True)
class Record:
    name: str
    start: int  # offset of the first data byte in the file
    size: int
    crc: int


def zip_records(path: str) -> list[Record]:
    """The stored (uncompressed) records of a torch zip file, by data offset."""
    out = []
    with open(path, "rb") as fh, zipfile.ZipFile(fh) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            fh.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
            out.append(Record(info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size, info.CRC))
    return sorted(out, key=lambda r: r.start)


@dataclass
class ReadLog:
    """(offset, length, crc, tensor) of every range read, per file; picklable (workers send theirs back)."""
    reads: dict[str, set] = field(default_factory=dict)

    def add(self, path: str, offset: int, data, tensor: str) -> None:
        self.reads.setdefault(path, set()).add((offset, len(data), crc32(data), tensor))

    def merge(self, other: "ReadLog") -> None:
        for path, spans in other.reads.items():
            self.reads.setdefault(path, set()).update(spans)


def check(log: ReadLog) -> int:
    """Compare every record something was read from with its stored CRC-32; CheckpointError naming the file
    and tensor of the first mismatch. Returns the bytes checked."""
    checked = 0
    for path, spans in sorted(log.reads.items()):
        try:
            records = zip_records(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: cannot read its zip directory to check it ({e})")
        ordered = sorted(spans)
        k = 0
        for rec in records:
            end = rec.start + rec.size
            while k < len(ordered) and ordered[k][0] + ordered[k][1] <= rec.start:
                k += 1
            mine = []
            j = k
            while j < len(ordered) and ordered[j][0] < end:
                mine.append(ordered[j])
                j += 1
            if not mine and "/data/" in rec.name:
                continue  # no byte of this tensor storage was read: nothing of it is passed on
            if not mine:  # the pickle and the other small records: what the loader took names and shapes from
                if _read_crc(path, rec.start, rec.size) != rec.crc:
                    raise CheckpointError(f"{path}: record {rec.name} fails its CRC-32 check: the file is corrupt "
                                          f"(nothing was written to the destination)")
                continue
            if _crc_of(path, rec, mine) != rec.crc:
                tensors = ", ".join(sorted({t for *_, t in mine}))
                raise CheckpointError(f"{path}: record {rec.name} (tensor {tensors}) fails its CRC-32 check: the bytes "
                                      f"read differ from what was written; the file is corrupt (nothing was written "
                                      f"to the destination)")
            checked += rec.size
    return checked


def _crc_of(path: str, rec: Record, spans) -> int:
    """The record's CRC from the logged ranges, reading the parts no range covers (or all of it when ranges
    overlap partially)."""
    end = rec.start + rec.size
    crc, at = 0, rec.start
    fd = None
    try:
        for off, n, c, _ in sorted(set(s[:3] + ("",) for s in spans)):
            if off < at or off + n > end:  # a partial overlap or a range across records: read it whole
                return _read_crc(path, rec.start, rec.size)
            if off > at:
                fd = fd if fd is not None else os.open(path, os.O_RDONLY)
                crc = crc32_combine(crc, _pread_crc(fd, path, at, off - at), off - at)
            crc = crc32_combine(crc, c, n)
            at = off + n
        if at < end:
            fd = fd if fd is not None else os.open(path, os.O_RDONLY)
            crc = crc32_combine(crc, _pread_crc(fd, path, at, end - at), end - at)
        return crc
    finally:
        if fd is not None:
            os.close(fd)


def _read_crc(path: str, start: int, size: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _pread_crc(fd, path, start, size)
    finally:
        os.close(fd)


def _pread_crc(fd: int, path: str, start: int, size: int, block: int = 8 << 20) -> int:
    crc, done = 0, 0
    while done < size:
        data = os.pread(fd, min(block, size - done), start + done)
        if not data:
            raise CheckpointError(f"{path}: ends before byte {start + done}; the file is truncated")
        crc = crc32(data, crc)
        done += len(data)
    return crc
