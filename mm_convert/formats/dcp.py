"""MindSpeed-MM's FSDP2 checkpoints: a torch.distributed.checkpoint (DCP) directory of the HF model's weights.

    <dcp_dir>/latest_checkpointed_iteration.txt   "release"
    <dcp_dir>/release/.metadata                   pickled DCP Metadata: per key the global shape, dtype and
                                                  chunks, where each chunk's bytes are; how keys nest
    <dcp_dir>/release/__K_0.distcp                records: a torch.save zip per tensor chunk, and the byte
                                                  records of the non-tensor entries (torch.save of the object)

The saved state dict is ``{"model": {<key>: tensor}, "checkpoint_version": 3.0}``; DCP flattens nested dicts
with ".", so a tensor is stored under ``model.<key>``. What the keys and shapes are (the HF names under a
prefix, fused expert tensors viewed 2-D) is the family spec's (``DCP_*`` in models/); this module knows the
directory, the records and the metadata. Records are written and read with formats/dist.py's code (one
torch.save zip per tensor, chunk bytes located inside their records and read with plain reads); a saved
checkpoint may hold any number of chunks per tensor (FSDP2 saves one per rank) and other entries (optimizer
state, ...), which are not read.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from . import dist
from . import mm as mm_format

if TYPE_CHECKING:
    from ..plan import OutputFile, Ref

STATE_KEY = "model"  # the entry of the saved state dict holding the model's tensors
CHECKPOINT_VERSION = mm_format.CHECKPOINT_VERSION
ITERATION = "release"
FILE_BYTES = dist.FILE_BYTES


def object_record(value) -> bytes:
    """The byte record DCP stores for a non-tensor entry: ``torch.save`` of it."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def first_file_info() -> dict:
    """The ``info`` of a DCP output's first record file: it also holds the byte record of ``checkpoint_version``
    (``objects``: [(key, bytes)], written before the tensors)."""
    return {"objects": [("checkpoint_version", object_record(CHECKPOINT_VERSION))]}


def resolve_dir(dcp_dir, option: str = "--cfg.dcp_dir") -> tuple[Path, Path]:
    """(iteration directory holding ``.metadata``, the checkpoint's root): ``dcp_dir`` may be either, the
    root naming the iteration in latest_checkpointed_iteration.txt (MindSpeed-MM's ``load_dir`` is the
    iteration directory itself)."""
    root = Path(dcp_dir)
    if not root.is_dir():
        raise CheckpointError(f"{option} {root}: not a directory; expected a torch.distributed.checkpoint directory "
                              f"(.metadata and __K_0.distcp files) or the directory above it")
    if (root / dist.DCP_METADATA).is_file():
        parent = root.parent
        top = parent if (parent / mm_format.TRACKER).is_file() else root
        return root, top
    it = mm_format.resolve_iteration_dir(root, option)
    if not (it / dist.DCP_METADATA).is_file():
        raise CheckpointError(f"{it / dist.DCP_METADATA}: missing; {option} must be a torch.distributed.checkpoint "
                              f"directory (.metadata and __K_0.distcp files) or the directory above it")
    return it, root


class DCPReader:
    """The tensors under STATE_KEY of a DCP directory, by their keys inside it (``Ref(file, STATE_KEY, key)``;
    the file part is not used: the metadata says where each chunk is)."""

    layout_free = True

    def __init__(self, it_dir: Path, slot: str = STATE_KEY):
        self.iter_dir = Path(it_dir)
        self.slot = slot
        self.tensors = dist.read_tensors(self.iter_dir, keep=lambda k: k.startswith(slot + "."))

    def keys(self) -> dict[str, dist.GlobalTensor]:
        """Key inside the slot -> stored tensor."""
        n = len(self.slot) + 1
        return {k[n:]: g for k, g in self.tensors.items()}

    def files(self) -> list[str]:
        """The files the tensors are read from, relative to the iteration directory (sizes, identity)."""
        return sorted({os.path.relpath(c.path, self.iter_dir) for g in self.tensors.values() for c in g.chunks}
                      | {dist.DCP_METADATA})

    def _tensor(self, ref: Ref) -> dist.GlobalTensor:
        try:
            return self.tensors[f"{ref.slot}.{ref.key}"]
        except KeyError:
            raise CheckpointError(f"{self.iter_dir / dist.DCP_METADATA}: no tensor {ref.slot}.{ref.key}")

    def meta(self, ref: Ref) -> tuple[torch.dtype, tuple[int, ...]]:
        g = self._tensor(ref)
        return g.dtype, g.shape

    def read(self, ref: Ref, start=None, shape=None) -> torch.Tensor:
        g = self._tensor(ref)
        lo = tuple(start) if start is not None else (0,) * len(g.shape)
        return dist.read_box(g, lo, tuple(shape) if shape is not None else g.shape, self.iter_dir)

    def locate(self, ref: Ref):
        """(file, offset, dtype, shape) where one chunk holds the tensor whole, else None (read box by box)."""
        g = self._tensor(ref)
        if not g.shape:
            return None
        where = dist.locate_box(g, (0,) * len(g.shape), g.shape)
        return (*where, g.dtype, g.shape) if where is not None else None


class DCPWriter:
    """Writes one planned record file of a DCP output: its byte records (``objects``), then one record per
    tensor in the tensor's own shape."""

    zip_records = False  # each record is a small zip whose CRC the record writer computes

    def __init__(self, planned: list[OutputFile]):
        self.objects = {f.path: list(f.info.get("objects", ())) for f in planned}

    def write(self, fh, slots, produce) -> None:
        ((slot, entries),) = slots.items()
        for _, data in self.objects.get(fh.path.name, ()):
            fh.write(data)
        dist.write_tensor_records(fh, [(dtype, shape) for _, dtype, shape in entries], lambda i: produce(slot, i))

    def finish(self, it_dir: Path, planned: list[OutputFile]) -> None:
        """``.metadata`` beside the record files (after they are written)."""
        (Path(it_dir) / dist.DCP_METADATA).write_bytes(metadata(planned))


def metadata(planned: list[OutputFile]) -> bytes:
    """The ``.metadata`` of the files DCPWriter writes from ``planned``: one chunk per tensor, each record's
    byte range, and the nesting of the keys (``model.<key>`` -> ("model", <key>)), so that DCP's loaders,
    given a nested state dict or none, find every entry."""
    tensors, chunks, objects, nesting = {}, [], [], {}
    for f in planned:
        pos = 0
        for key, data in f.info.get("objects", ()):
            objects.append((key, f.path, pos, len(data)))
            nesting[key] = (key,)
            pos += len(data)
        for slot, ts in f.slots.items():
            for t in ts:
                fqn = f"{slot}.{t.key}"
                length = dist.record_length(t.dtype, t.shape)
                tensors[fqn] = (t.dtype, tuple(t.shape))
                chunks.append((fqn, (0,) * len(t.shape), tuple(t.shape), f.path, pos, length))
                nesting[fqn] = (slot, t.key)
                pos += length
    return dist.build_metadata(tensors, chunks, objects, nesting)
