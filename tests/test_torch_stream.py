"""Tests for mm_convert.formats.torch_stream (streamed torch.save-format writer)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import struct
import tracemalloc
import weakref
import zipfile

import numpy as np
import pytest
import torch

from mm_convert.formats import torch_stream as ts
from mm_convert.formats.torch_stream import TensorSpec, read_torch_file, write_torch_file

GiB = 1 << 30


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(3, 5, generator=g).to(torch.float16),
        "fp32": torch.randn(7, generator=g),
        "i64": torch.randint(-(2**40), 2**40, (2, 3), generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "bf16_nan": torch.tensor([float("nan"), -0.0, float("inf"), 1e-40], dtype=torch.bfloat16),
    }


def _mm_like(t):
    """A MindSpeed-MM / Megatron-like shard with VPP chunks."""
    return {
        "model0": {
            "embedding.word_embeddings.weight": t["bf16"],
            "decoder.layers.0.self_attention.linear_qkv.weight": t["fp16"],
            "decoder.layers.0.self_attention.core_attention._extra_state": None,
            "decoder.layers.0.mlp.linear_fc1.bias": t["empty"],
        },
        "model1": {
            "decoder.layers.1.input_layernorm.weight": t["fp32"],
            "decoder.layers.1.counts": t["i64"],
            "decoder.layers.1.scale": t["scalar"],
            "decoder.layers.1.special": t["bf16_nan"],
        },
        "checkpoint_version": 3.0,
        "iteration": 0,
        "note": "streamed",
        "flags": [True, False, None, 1.5, (1, 2)],
    }


def _specs(obj):
    """Replace every tensor in obj by a TensorSpec (key = the tensor)."""
    if isinstance(obj, torch.Tensor):
        return TensorSpec(obj.dtype, tuple(obj.shape), key=id(obj))
    if isinstance(obj, dict):
        return {k: _specs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_specs(v) for v in obj]
    return obj


def _assert_same(a, b, path="root"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.stride() == b.stride(), path
        # bit equality (NaN, -0.0 included)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def _write_streamed(path, ref):
    by_id = {}

    def collect(o):
        if isinstance(o, torch.Tensor):
            by_id[id(o)] = o
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(ref)
    calls = []

    def produce(p, spec):
        calls.append(p)
        return by_id[spec.key]

    n = write_torch_file(path, _specs(ref), produce)
    return n, calls


def test_identical_to_torch_save_except_serialization_id(tmp_path):
    ref = _mm_like(_tensors())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa, pb = tmp_path / "a" / "model_optim_rng.pt", tmp_path / "b" / "model_optim_rng.pt"
    torch.save(ref, pa)
    n, _ = _write_streamed(pb, ref)
    a, b = pa.read_bytes(), pb.read_bytes()
    assert n == len(b) == len(a)

    za, zb = zipfile.ZipFile(pa), zipfile.ZipFile(pb)
    ia, ib = za.infolist(), zb.infolist()
    assert [i.filename for i in ia] == [i.filename for i in ib]
    assert ib[0].filename == "model_optim_rng/data.pkl"
    for x, y in zip(ia, ib):
        assert (x.header_offset, x.file_size, x.compress_size, x.flag_bits, x.compress_type) == (
            y.header_offset, y.file_size, y.compress_size, y.flag_bits, y.compress_type), x.filename
        if not x.filename.endswith("serialization_id"):
            assert x.CRC == y.CRC, x.filename
    assert zb.read("model_optim_rng/data.pkl") == za.read("model_optim_rng/data.pkl")
    assert zb.testzip() is None  # all CRCs right
    # Every byte before the serialization id record is the same as torch.save's.
    sid = next(i for i in ib if i.filename.endswith(".data/serialization_id"))
    assert a[: sid.header_offset] == b[: sid.header_offset]
    assert len(zb.read(sid)) == 40 and zb.read(sid).isdigit()


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_loads_like_torch_save(tmp_path, mmap):
    ref = _mm_like(_tensors())
    path = tmp_path / "shard.pt"
    _, calls = _write_streamed(path, ref)
    # produce is called once per placeholder, in data.pkl order, with its path
    assert calls == [
        ("model0", "embedding.word_embeddings.weight"),
        ("model0", "decoder.layers.0.self_attention.linear_qkv.weight"),
        ("model0", "decoder.layers.0.mlp.linear_fc1.bias"),
        ("model1", "decoder.layers.1.input_layernorm.weight"),
        ("model1", "decoder.layers.1.counts"),
        ("model1", "decoder.layers.1.scale"),
        ("model1", "decoder.layers.1.special"),
    ]
    got = torch.load(path, weights_only=True, mmap=mmap)
    torch.save(ref, tmp_path / "ref.pt")
    _assert_same(got, torch.load(tmp_path / "ref.pt", weights_only=True, mmap=mmap))
    _assert_same(got["model1"]["decoder.layers.1.scale"], ref["model1"]["decoder.layers.1.scale"])
    assert got["model1"]["decoder.layers.1.scale"].dim() == 0
    assert got["model0"]["decoder.layers.0.mlp.linear_fc1.bias"].shape == (0, 4)


@contextlib.contextmanager
def _computed_storage_offsets(monkeypatch):
    """Make torch compute storage offsets from the layout it expects (instead
    of reading each local header) and assert them against the real ones."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        pytest.skip("this torch has no serialization config")
    if "load.calculate_storage_offsets" not in config._config:
        pytest.skip("this torch has no calculate_storage_offsets")
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        yield
    finally:
        config.load.calculate_storage_offsets = old


def test_storage_offset_calculation_path(tmp_path, monkeypatch):
    ref = _mm_like(_tensors())
    path = tmp_path / "shard.pt"
    _write_streamed(path, ref)
    with _computed_storage_offsets(monkeypatch):
        for mmap in (False, True):
            _assert_same(torch.load(path, weights_only=True, mmap=mmap), ref)


def test_real_tensors_noncontiguous_shared_spec_and_progress(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    spec = TensorSpec(torch.float32, (6, 4))
    obj = {
        "real": base[:, 1:3],  # a non-contiguous view, written compact
        "a": spec,
        "b": spec,  # same placeholder object twice -> one storage, one produce call
        "c": [TensorSpec(torch.int64, ()), {"d": TensorSpec(torch.bfloat16, (3,))}],
    }
    produced = {
        ("a",): base.t(),  # non-contiguous result
        ("c", 0): torch.tensor(-7),
        ("c", 1, "d"): torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
    }
    calls, prog = [], []

    def produce(p, s):
        calls.append(p)
        return produced[p]

    write_torch_file(tmp_path / "x.pt", obj, produce, progress=lambda d, t: prog.append((d, t)))
    assert calls == [("a",), ("c", 0), ("c", 1, "d")]
    total = 8 * 4 + 24 * 4 + 8 + 3 * 2
    assert prog[-1] == (total, total) and len(prog) == 4
    got = read_torch_file(tmp_path / "x.pt")
    assert torch.equal(got["real"], base[:, 1:3]) and got["real"].is_contiguous()
    assert torch.equal(got["a"], base.t()) and got["a"] is got["b"]
    assert got["c"][0].item() == -7 and got["c"][0].dtype == torch.int64
    assert torch.equal(got["c"][1]["d"], produced[("c", 1, "d")])


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.zeros(2, 3, dtype=torch.float32), "torch.float32"),
        (torch.zeros(3, 2, dtype=torch.bfloat16), r"\(3, 2\)"),
        ("not a tensor", "str"),
    ],
)
def test_produce_mismatch_raises_and_removes_file(tmp_path, bad, msg):
    obj = {"model": {"ok": TensorSpec(torch.bfloat16, (1,)), "w.weight": TensorSpec(torch.bfloat16, (2, 3))}}

    def produce(p, spec):
        return torch.ones(1, dtype=torch.bfloat16) if p[-1] == "ok" else bad

    path = tmp_path / "bad.pt"
    with pytest.raises(ValueError, match=msg) as ei:
        write_torch_file(path, obj, produce)
    assert "model/w.weight" in str(ei.value)
    assert not path.exists()


def test_rejects_objects_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match="args/x"):  # a Namespace (Megatron's args) is written, its values checked
        write_torch_file(tmp_path / "n.pt", {"args": argparse.Namespace(a=1, x=object())})
    with pytest.raises(TypeError, match="model/lr"):
        write_torch_file(tmp_path / "n.pt", {"model": {"lr": np.float64(1.0)}})
    if hasattr(torch, "uint16"):
        with pytest.raises(ValueError, match="model/w"):
            write_torch_file(tmp_path / "n.pt", {"model": {"w": TensorSpec(torch.uint16, (2,))}})
    assert not (tmp_path / "n.pt").exists()


def test_memory_stays_at_one_tensor(tmp_path):
    """20 tensors of 8 MB: the writer never holds more than the current one
    and makes no Python-side copy of tensor bytes."""
    n, numel = 20, 2 * 1024 * 1024  # float32 -> 8 MB each
    obj = {"model": {f"layer{i}.weight": TensorSpec(torch.float32, (numel,)) for i in range(n)}}
    alive_refs: list[weakref.ref] = []
    max_alive = 0

    def produce(p, spec):
        nonlocal max_alive
        gc.collect()
        max_alive = max(max_alive, sum(r() is not None for r in alive_refs))
        v = float(len(alive_refs))
        if len(alive_refs) % 2:  # every other one a non-contiguous view
            t = torch.full((2 * numel,), v, dtype=spec.dtype)[::2]
        else:
            t = torch.full(spec.shape, v, dtype=spec.dtype)
        alive_refs.append(weakref.ref(t))
        return t

    tracemalloc.start()
    try:
        size = write_torch_file(tmp_path / "big.pt", obj, produce)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max_alive == 0, "an earlier tensor was still referenced when the next was produced"
    assert peak < numel * 4 // 2, f"Python-side peak {peak} bytes while writing"
    assert size > n * numel * 4
    got = read_torch_file(tmp_path / "big.pt")
    for i in (0, 7, 19):
        t = got["model"][f"layer{i}.weight"]
        assert t.shape == (numel,) and t[0].item() == i and t[-1].item() == i


def test_read_errors_are_one_line_value_errors(tmp_path):
    good = tmp_path / "good.pt"
    write_torch_file(good, {"w": torch.arange(10.0)})
    data = good.read_bytes()

    def check(path, words):
        with pytest.raises(ValueError) as ei:
            read_torch_file(path)
        msg = str(ei.value)
        assert "\n" not in msg and str(path) in msg and words in msg, msg

    for cut in (len(data) - 10, len(data) // 2, 100):
        trunc = tmp_path / f"trunc{cut}.pt"
        trunc.write_bytes(data[:cut])
        check(trunc, "truncated or corrupt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    check(junk, "not a torch zip")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    check(empty, "not a torch zip")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    check(legacy, "legacy")
    code = tmp_path / "code.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, code)
    check(code, "needs code")

    assert torch.equal(read_torch_file(good)["w"], torch.arange(10.0))


# ----------------------------------------------------------------- zip64


@pytest.mark.parametrize(
    "offset, size",
    [(0, 12), (0, 0), (4095, 3), (2**32 - 100, 10), (2**32, 12), (0, 2**32 - 1), (0, 5 * GiB), (9 * GiB, 5 * GiB)],
)
def test_local_header_layout_matches_torch(tmp_path, offset, size):
    """Where torch (reading) expects a record's data to start, for offsets and
    sizes on both sides of the zip64 limit."""
    ref = tmp_path / "m.pt"
    torch.save({"w": torch.ones(1)}, ref)
    reader = torch._C.PyTorchFileReader(str(ref))
    if not hasattr(reader, "get_record_offset_no_read"):
        pytest.skip("this torch cannot compute record offsets")
    hdr = ts._local_header(b"m/data/0", size, offset)
    assert (offset + len(hdr)) % 64 == 0
    assert offset + len(hdr) == reader.get_record_offset_no_read(offset, "data/0", size, 64)
    big = size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF
    assert hdr[38:40] == (b"\x01\x00" if big else b"FB")  # zip64 extra field comes first


def _sparse_ok(tmp_path) -> bool:
    p = tmp_path / "sparse_probe"
    with open(p, "wb") as f:
        f.seek(5 * GiB)
        f.write(b"x")
    ok = os.stat(p).st_blocks * 512 < 64 << 20
    p.unlink()
    return ok


def _hole_record(zw, name, size):
    """A stored record whose data is a sparse hole (CRC left wrong; only
    loaders that do not read the record's bytes may look at it)."""
    zw.begin(name, size)
    zw.fh.seek(size, os.SEEK_CUR)
    zw.pos += size
    zw._written = size
    zw.end()


def test_zip64_big_record_and_offsets_beyond_4gib(tmp_path):
    """A first record of 4 GiB + 123 bytes (sparse), then a whole checkpoint
    whose records all start past 4 GiB: zip64 extras in local and central
    headers, 24-byte data descriptors, zip64 end records, 0xFFFFFFFF in the
    classic end record."""
    if not _sparse_ok(tmp_path):
        pytest.skip("filesystem has no sparse files")
    ref = _mm_like(_tensors())
    path = tmp_path / "far.pt"
    with open(path, "wb") as fh:
        zw = ts._ZipWriter(fh, "far")
        _hole_record(zw, "padding", 4 * GiB + 123)
        ts._write_archive(zw, _specs(ref), _producer(ref))
    with open(path, "rb") as fh:
        fh.seek(-22, os.SEEK_END)
        eocd = struct.unpack("<IHHHHIIH", fh.read(22))
    assert eocd[0] == 0x06054B50 and eocd[6] == 0xFFFFFFFF
    z = zipfile.ZipFile(path)
    infos = z.infolist()
    assert infos[0].file_size == 4 * GiB + 123 and infos[0].compress_size == 4 * GiB + 123
    assert all(i.header_offset > 4 * GiB for i in infos[1:])
    for i in infos[1:]:
        z.read(i)  # checks each CRC
    assert z.read("far/version") == b"3\n"
    for mmap in (False, True):
        _assert_same(torch.load(path, weights_only=True, mmap=mmap), ref)


def _producer(ref):
    by_id = {}

    def collect(o):
        if isinstance(o, torch.Tensor):
            by_id[id(o)] = o
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(ref)
    return lambda p, spec: by_id[spec.key]


def test_zip64_record_larger_than_4gib(tmp_path, monkeypatch):
    """A 5 GiB storage record (its bytes left as a sparse hole, CRC not
    checked by mmap loading) followed by a small one that must still be
    found at the right place."""
    if not _sparse_ok(tmp_path):
        pytest.skip("filesystem has no sparse files")
    size = 5 * GiB
    small = torch.arange(5, dtype=torch.int64)
    obj = {"huge": TensorSpec(torch.uint8, (size,)), "small": small}
    pkl, _ = ts._dump_pickle(obj)
    path = tmp_path / "huge.pt"
    with open(path, "wb") as fh:
        zw = ts._ZipWriter(fh, "huge")
        zw.add("data.pkl", pkl)
        zw.add(".format_version", b"1")
        zw.add(".storage_alignment", b"64")
        zw.add("byteorder", b"little")
        _hole_record(zw, "data/0", size)
        zw.begin("data/1", small.numel() * 8)
        ts._write_tensor_bytes(zw, small)
        zw.end()
        zw.add("version", b"3\n")
        zw.add(".data/serialization_id", zw.serialization_id().encode())
        zw.finish()
    info = zipfile.ZipFile(path).getinfo("huge/data/0")
    assert info.file_size == size and info.compress_size == size
    for computed in (False, True):
        with _computed_storage_offsets(monkeypatch) if computed else contextlib.nullcontext():
            got = torch.load(path, weights_only=True, mmap=True)
        assert got["huge"].shape == (size,) and got["huge"][-1].item() == 0
        assert torch.equal(got["small"], small)


def test_megatron_args_namespace_is_written_and_read_back_safely(tmp_path):
    """A training save's args (argparse.Namespace of plain values and dtypes) as resplit keeps it: written by the
    stream writer, read by the safe unpickler as inert attributes, by torch.load(weights_only=False) as a Namespace."""
    from mm_convert.formats import safe_pickle
    args = argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16, data_path=["a"], lr=1e-5)
    write_torch_file(tmp_path / "a.pt", {"args": args, "iteration": 7, "model": {"w": torch.arange(3.0)}})
    got = safe_pickle.load(tmp_path / "a.pt")
    assert got["args"].to_namespace() == args and got["iteration"] == 7
    assert torch.load(tmp_path / "a.pt", weights_only=False)["args"] == args

