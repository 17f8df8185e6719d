"""Read torch checkpoint files that training wrote, without running any code named in them.

Megatron-LM, megatron-core and MindSpeed-MM save ``model_optim_rng.pt`` with ``torch.save`` of a dict that
holds, besides the tensors, ``args`` (an ``argparse.Namespace``), numpy RNG state, ``io.BytesIO``
``_extra_state`` of TransformerEngine layers, enums and dtypes. ``torch.load(weights_only=True)`` refuses
those; ``weights_only=False`` imports and calls whatever the pickle names. This module sits between: torch's
own zip reader (memory-mapped, so tensors are read only when sliced) with an unpickler whose ``find_class``
never imports anything. Each global the pickle names is answered from a fixed table:

* torch's tensor rebuilders, ``torch.Size``, dtypes, layouts, memory formats, ``collections.OrderedDict``,
  builtin containers: taken as they are (what ``weights_only`` allows);
* numpy arrays, dtypes and scalars (numpy 1.x and 2.x module paths): rebuilt by numpy's data-only
  constructors (``np.random.get_state()`` is a tuple holding one);
* ``argparse.Namespace``, ``io.BytesIO``, ``pathlib`` paths, and the enums and config classes of Megatron,
  megatron-core, MindSpeed(-MM) and TransformerEngine: rebuilt as :class:`Saved` records (the class's dotted
  name, the arguments it was called with, its state); their code is never imported;
* anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, a user's class): refused with
  :class:`UnsafeGlobal` naming it, before it could be called.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import pickle
import types
from typing import Any

import torch

# Packages whose classes are rebuilt as inert records: their enums and configs end up in ``args`` (and their
# code is never imported, so a class of theirs cannot act).
TRAINING_PACKAGES = ("megatron.", "mindspeed.", "mindspeed_mm.", "mindspeed_llm.", "transformer_engine.", "apex.",
                     "torch.optim.", "torch.distributed.checkpoint.", "signal.")


class UnsafeGlobal(pickle.UnpicklingError):
    """The pickle names a global that is neither tensor data nor a known data-only object."""

    def __init__(self, dotted: str):
        super().__init__(dotted)
        self.dotted = dotted


class Saved:
    """An object of a class named in the file, rebuilt as data: ``dotted`` (the class's module.name), ``args``
    (what it was called with) and its attributes or ``state`` (what pickle's BUILD gave it)."""

    dotted = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_saved_args", args)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)) \
                and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        else:
            object.__setattr__(self, "_saved_state", state)

    @property
    def args(self) -> tuple:
        return self.__dict__.get("_saved_args", ())

    @property
    def state(self):
        return self.__dict__.get("_saved_state")

    @property
    def value(self):
        """An enum member's value (enums pickle as ``Class(value)``)."""
        return self.args[0] if len(self.args) == 1 else self.args

    def fields(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_saved_")}

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.args)) or ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"<saved {self.dotted}({inner})>"


class SavedNamespace(Saved):
    """``argparse.Namespace`` (Megatron's ``args``): its attributes, as read."""

    dotted = "argparse.Namespace"

    def to_namespace(self) -> argparse.Namespace:
        """An ``argparse.Namespace`` of the attributes whose values are plain data (what Megatron's loader
        compares: sizes, counts, flags, names); records of classes the tool does not know are left out."""
        return argparse.Namespace(**{k: v for k, v in self.fields().items() if _plain(v)})


class SavedBytes(Saved):
    """``io.BytesIO`` (TransformerEngine's ``_extra_state``): ``data`` holds its bytes."""

    dotted = "io.BytesIO"

    @property
    def data(self) -> bytes:
        state = self.state
        return bytes(state[0]) if isinstance(state, tuple) and state else b""


_saved_classes: dict[str, type] = {}


def saved_class(dotted: str) -> type:
    """The :class:`Saved` subclass standing for the class ``dotted`` (one per name, made on first use)."""
    if dotted not in _saved_classes:
        _saved_classes[dotted] = type(dotted.rsplit(".", 1)[-1], (Saved,), {"dotted": dotted, "__module__": __name__})
    return _saved_classes[dotted]


def _plain(v) -> bool:
    if v is None or type(v) in (bool, int, float, str, bytes, complex) or isinstance(v, torch.dtype):
        return True
    if type(v) in (list, tuple):
        return all(_plain(x) for x in v)
    if type(v) is dict:
        return all(type(k) in (str, int) and _plain(x) for k, x in v.items())
    return False


# ---- what each allowed global becomes ----------------------------------------------------------------------
def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 without what could reach code: hooks and attribute state are dropped."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, expected a storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, dtype=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v3 (untyped storages: float8, uint16...), hooks and state dropped."""
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("tensor (v3) rebuilt from something other than a storage and a dtype")
    t = torch.empty((0,), dtype=dtype, device=storage._untyped_storage.device)
    return t.set_(storage._untyped_storage, storage_offset, size, stride)


def _rebuild_meta(dtype, size, stride, requires_grad=False):
    return torch.empty_strided(size, stride, dtype=dtype, device="meta")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"parameter rebuilt from a {type(data).__name__}, expected a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2 (tensor subclasses): the plain tensor; ``func`` is one of ours."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or new_type not in (torch.Tensor, _Parameter):
        raise pickle.UnpicklingError("a tensor subclass other than torch.nn.Parameter")
    return func(*args)


class _Parameter:
    """Stands for torch.nn.parameter.Parameter where it appears as a type (never instantiated)."""


def _codecs_encode(text, encoding="utf-8"):
    # pickle protocol 2 stores bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode with arguments other than (str, 'latin1')")
    return text.encode(encoding)


def _defaultdict(factory=None, *args):
    return collections.defaultdict(None)  # the factory (some global) is not kept, let alone called


def _reconstructor(cls, base, state=None):
    """copyreg._reconstructor (protocol 0/1 objects) for the classes this table stands in for."""
    if not (isinstance(cls, type) and issubclass(cls, Saved)):
        raise pickle.UnpicklingError("copyreg._reconstructor of a class that is not a known data-only class")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


def _path(*parts):
    return str(pathlib.PurePosixPath(*map(str, parts)))  # a pathlib path becomes the string it stands for


def _torch_attr(name: str, kinds=(torch.dtype, torch.layout, torch.memory_format)):
    """A torch constant (dtype, layout, memory format) or one of the few torch types pickles name."""
    value = getattr(torch, name, None)
    if isinstance(value, kinds):
        return value
    return {"Size": torch.Size, "Tensor": torch.Tensor, "device": torch.device}.get(name)


def _numpy(module: str, name: str):
    """numpy's own data-only constructors (array/dtype/scalar from bytes), under both 1.x and 2.x paths."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if name == "_reconstruct":
            def reconstruct(subtype, shape, dtype):
                if subtype is not np.ndarray:
                    raise pickle.UnpicklingError("numpy array of a subclass")
                return np.ndarray.__new__(np.ndarray, shape, dtype)
            return reconstruct
        if name == "scalar":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray.scalar
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name, None)
    return None


_TABLE: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _Parameter,
    ("torch.serialization", "_get_layout"): lambda name: _torch_attr(str(name).replace("torch.", ""), torch.layout),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): _defaultdict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice, ("builtins", "range"): range,
    ("builtins", "list"): list, ("builtins", "dict"): dict, ("builtins", "tuple"): tuple,
    ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "str"): str, ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes, ("builtins", "object"): object,
    # protocol 2 writes builtins under their Python 2 module name
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset, ("__builtin__", "list"): list,
    ("__builtin__", "dict"): dict, ("__builtin__", "tuple"): tuple, ("__builtin__", "bytearray"): bytearray,
    ("__builtin__", "complex"): complex, ("__builtin__", "slice"): slice, ("__builtin__", "xrange"): range,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor, ("copy_reg", "_reconstructor"): _reconstructor,
    ("argparse", "Namespace"): SavedNamespace,
    ("types", "SimpleNamespace"): SavedNamespace,
    ("_io", "BytesIO"): SavedBytes, ("io", "BytesIO"): SavedBytes,
    ("datetime", "datetime"): datetime.datetime, ("datetime", "date"): datetime.date,
    ("datetime", "timedelta"): datetime.timedelta, ("datetime", "timezone"): datetime.timezone,
}
for _cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
    _TABLE[("pathlib", _cls)] = _TABLE[("pathlib._local", _cls)] = _path  # pathlib._local: Python 3.13


def resolve_global(module: str, name: str):
    """What a pickle's global ``module.name`` becomes; :class:`UnsafeGlobal` for anything not known inert."""
    found = _TABLE.get((module, name))
    if found is None and module == "torch":
        found = _torch_attr(name)
    if found is None and (module, name) in (("torch", "Generator"), ("torch._C", "Generator")):
        found = saved_class("torch.Generator")  # RNG tracker states of graph-safe RNG: kept as a record
    if found is None and module.startswith("numpy"):
        found = _numpy(module, name)
    if found is None and (module + ".").startswith(TRAINING_PACKAGES):
        found = saved_class(f"{module}.{name}")
    if found is None:
        raise UnsafeGlobal(f"{module}.{name}")
    return found


class SafeUnpickler(pickle.Unpickler):
    """An unpickler whose globals come from :func:`resolve_global`: nothing is imported, nothing the file
    names is called (torch's loader subclasses it and adds ``persistent_load`` for the tensor records)."""

    def find_class(self, module, name):
        return resolve_global(str(module), str(name))


def _load(file, **kwargs):
    return SafeUnpickler(file, **kwargs).load()


# torch.load takes, as its pickle module, an object with Unpickler and load.
pickle_module = types.SimpleNamespace(__name__="mm_convert_safe_pickle", Unpickler=SafeUnpickler, load=_load)


def load(path, mmap: bool = True):
    """``torch.load`` of ``path`` onto the CPU through :class:`SafeUnpickler`; tensors memory-mapped."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=pickle_module)
