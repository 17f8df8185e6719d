"""ParallelLayout: TP size and the per-stage layer lists of the vision encoder ("vit") and LLM ("llm").

Lists are nested ``[chunk][stage]`` (virtual pipeline chunks outer); a flat list is one chunk. Flattened in
order, chunk ``v`` of stage ``p`` is position ``v * pp + p``. Layer indices restart at 0 in every position.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, fields, replace
from typing import Sequence

from .errors import LayoutError

MODULES = ("vit", "llm")
VOCAB = "vocab_size"  # the divisibility entry (``tp_divisible``) of the vocabulary, which padding can satisfy


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: ``vocab`` rounded up to a multiple of ``divisible_by`` x ``tp``."""
    step = divisible_by * tp
    return -(-vocab // step) * step


def parse_layer_list(value, option: str) -> tuple[tuple[int, ...], ...]:
    """Accept ``[1,10,10,7]``, ``[[12,16]]``, ``"[[0,1],[1,2]]"``, ``"1,10,10,7"`` or a bare int."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
        except (ValueError, SyntaxError):
            raise LayoutError(f"{option}: cannot parse {text!r}; expected a list such as [1,10,10,7] or [[12,16]]")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise LayoutError(f"{option}: expected a non-empty list of layer counts, got {value!r}")
    nested = isinstance(value[0], (list, tuple))
    chunks = value if nested else [value]
    out = []
    for chunk in chunks:
        if not isinstance(chunk, (list, tuple)) or not chunk:
            raise LayoutError(f"{option}: expected a list of lists of layer counts, got {value!r}")
        row = []
        for n in chunk:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise LayoutError(f"{option}: layer counts must be integers >= 0, got {n!r} in {value!r}")
            row.append(n)
        out.append(tuple(row))
    if len({len(r) for r in out}) != 1:
        raise LayoutError(f"{option}: every virtual chunk must list the same number of stages, got {value!r}")
    return tuple(out)


@dataclass(frozen=True)
class ParallelLayout:
    tp_size: int
    llm_pp_layers: tuple[tuple[int, ...], ...]
    vit_pp_layers: tuple[tuple[int, ...], ...]
    vit_tp_size: int = 0  # 0: same as tp_size
    ep_size: int = 1      # expert parallel: the experts of each MoE layer split evenly over ep_size ranks
    padded_vocab_size: int = 0  # rows of the embedding and output layer (Megatron's vocab padding, zero rows
    # after the config's vocab_size); 0: no padding

    @classmethod
    def create(cls, tp_size: int = 1, llm_pp_layers=None, vit_pp_layers=None, vit_tp_size: int = 0,
               *, ep_size: int = 1, llm_layers: int | None = None, vit_layers: int | None = None,
               padded_vocab_size: int = 0, prefix: str = "parallel_config") -> "ParallelLayout":
        """Build from user values. Missing layer lists default to everything on one stage."""
        for name, v in (("tp_size", tp_size), ("vit_tp_size", vit_tp_size), ("ep_size", ep_size),
                        ("padded_vocab_size", padded_vocab_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name in ("tp_size", "ep_size") else 0):
                raise LayoutError(f"{prefix}.{name}: expected a positive integer, got {v!r}")
        if llm_pp_layers is None and vit_pp_layers is None and llm_layers is not None and vit_layers is not None:
            llm_pp_layers, vit_pp_layers = [llm_layers], [vit_layers]  # everything on one stage
        for name, v in (("llm_pp_layers", llm_pp_layers), ("vit_pp_layers", vit_pp_layers)):
            if v is None:
                raise LayoutError(f"{prefix}.{name}: required (a list of layer counts per pipeline stage)")
        layout = cls(tp_size, parse_layer_list(llm_pp_layers, f"{prefix}.llm_pp_layers"),
                     parse_layer_list(vit_pp_layers, f"{prefix}.vit_pp_layers"), vit_tp_size, ep_size,
                     padded_vocab_size)
        layout.check_shape(prefix)
        return layout

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def pp_size(self) -> int:
        return len(self.llm_pp_layers[0])

    @property
    def vpp_size(self) -> int:
        return len(self.llm_pp_layers)

    @property
    def model_ranks(self) -> int:
        """Processes one copy of the model runs on: tp x pp x ep."""
        return self.tp_size * self.pp_size * self.ep_size

    @property
    def num_positions(self) -> int:
        return self.pp_size * self.vpp_size

    @property
    def effective_vit_tp(self) -> int:
        return self.vit_tp_size or self.tp_size

    def module_tp(self, module: str) -> int:
        """The split of a module's weights: its TP size ("ep": the expert-parallel size)."""
        return {"vit": self.effective_vit_tp, "ep": self.ep_size}.get(module, self.tp_size)

    def module_tp_rank(self, module: str, tp_rank: int) -> int:
        """TP rank of ``module``'s weights held by global tp rank ``tp_rank`` (vision TP may be smaller:
        then vision weights are replicated over contiguous groups of tp_size / vit_tp_size ranks)."""
        return tp_rank * self.module_tp(module) // self.tp_size

    # ---- positions ---------------------------------------------------------------------------------------
    def counts(self, module: str) -> list[int]:
        """Layer count per flat position."""
        lists = self.vit_pp_layers if module == "vit" else self.llm_pp_layers
        return [n for chunk in lists for n in chunk]

    def position(self, vpp_rank: int, pp_rank: int) -> int:
        return vpp_rank * self.pp_size + pp_rank

    def split_position(self, pos: int) -> tuple[int, int]:
        """(vpp_rank, pp_rank) of a flat position."""
        return divmod(pos, self.pp_size)

    def layer_range(self, module: str, pos: int) -> range:
        """Global layer indices of ``module`` held at flat position ``pos``."""
        counts = self.counts(module)
        start = sum(counts[:pos])
        return range(start, start + counts[pos])

    def locate(self, module: str, layer: int) -> tuple[int, int]:
        """(flat position, local index) of a global layer."""
        for pos in range(self.num_positions):
            r = self.layer_range(module, pos)
            if layer in r:
                return pos, layer - r.start
        raise LayoutError(f"{module} layer {layer} is not placed by the layout")

    def first_position(self, module: str) -> int | None:
        nonzero = [p for p, n in enumerate(self.counts(module)) if n]
        return nonzero[0] if nonzero else None

    def last_position(self, module: str) -> int | None:
        nonzero = [p for p, n in enumerate(self.counts(module)) if n]
        return nonzero[-1] if nonzero else None

    # ---- checks ------------------------------------------------------------------------------------------
    def check_shape(self, prefix: str = "parallel_config") -> None:
        if len(self.llm_pp_layers) != len(self.vit_pp_layers) or len(self.llm_pp_layers[0]) != len(self.vit_pp_layers[0]):
            raise LayoutError(
                f"{prefix}.llm_pp_layers {_fmt(self.llm_pp_layers)} and {prefix}.vit_pp_layers {_fmt(self.vit_pp_layers)} "
                f"must have the same shape (chunks x stages)")
        if self.vit_tp_size and (self.vit_tp_size > self.tp_size or self.tp_size % self.vit_tp_size):
            raise LayoutError(f"{prefix}.vit_tp_size {self.vit_tp_size} must divide {prefix}.tp_size {self.tp_size}")
        last_vit = self.last_position("vit")
        first_llm = self.first_position("llm")
        if last_vit is not None and first_llm is not None and first_llm < last_vit:
            raise LayoutError(
                f"{prefix}: the vision encoder must come before the LLM, but llm_pp_layers {_fmt(self.llm_pp_layers)} "
                f"places LLM layers at position {first_llm}, before the last vision layers at position {last_vit} "
                f"(vit_pp_layers {_fmt(self.vit_pp_layers)})")

    def check_layer_counts(self, vit_layers: int, llm_layers: int, prefix: str = "parallel_config") -> None:
        for module, want, lists in (("vit", vit_layers, self.vit_pp_layers), ("llm", llm_layers, self.llm_pp_layers)):
            got = sum(self.counts(module))
            if got != want:
                what = "vision depth" if module == "vit" else "num_hidden_layers"
                raise LayoutError(f"{prefix}.{module}_pp_layers {_fmt(lists)} sums to {got}, but the config's {what} is {want}")

    def vocab_rows(self, vocab: int) -> int:
        """Rows of the embedding and output layer for a model of ``vocab`` tokens."""
        return self.padded_vocab_size or vocab

    def check_divisible(self, sizes: Sequence[tuple[str, str, int]], prefix: str = "parallel_config") -> None:
        """sizes: (module, description, value) that the module's TP size must divide; all misfits in one line.
        The vocabulary (``VOCAB``) is checked as padded, and its misfit names the padding option."""
        bad: dict[str, list[str]] = {}
        vocab_misfit = False
        for module, what, value in sizes:
            tp = self.module_tp(module)
            if what == VOCAB:
                if self.padded_vocab_size and self.padded_vocab_size < value:
                    raise LayoutError(f"{prefix}: the checkpoint's {self.padded_vocab_size} vocabulary rows are fewer "
                                      f"than the config's vocab_size {value}")
                value = self.vocab_rows(value)
                vocab_misfit = vocab_misfit or bool(value % tp)
            if value % tp:
                opt = "ep_size" if module == "ep" else "vit_tp_size" if module == "vit" and self.vit_tp_size else "tp_size"
                bad.setdefault(f"{prefix}.{opt} {tp}", []).append(f"{what} ({value})")
        if bad:
            raise LayoutError("; ".join(f"{opt} does not divide the {', '.join(items)}" for opt, items in bad.items())
                              + ("; choose sizes that divide each" if any("ep_size" in o for o in bad) else
                   "; choose a TP size that divides each")
                              + (f" (or pad the vocabulary: {prefix}.make_vocab_size_divisible_by N pads it to a "
                                 f"multiple of N x tp)" if vocab_misfit else ""))

    def describe(self) -> str:
        s = f"tp={self.tp_size}"
        if self.vit_tp_size and self.vit_tp_size != self.tp_size:
            s += f" vit_tp={self.vit_tp_size}"
        s += f" ep={self.ep_size}" if self.ep_size > 1 else ""
        return s + f" pp={self.pp_size}" + (f" vpp={self.vpp_size}" if self.vpp_size > 1 else "") + \
            f" llm={_fmt(self.llm_pp_layers)} vit={_fmt(self.vit_pp_layers)}" + \
            (f" vocab_rows={self.padded_vocab_size} (padded)" if self.padded_vocab_size else "")

    def to_dict(self) -> dict:
        return {"tp_size": self.tp_size, "vit_tp_size": self.vit_tp_size, **({"ep_size": self.ep_size} if self.ep_size > 1 else {}),
                "llm_pp_layers": [list(c) for c in self.llm_pp_layers],
                "vit_pp_layers": [list(c) for c in self.vit_pp_layers],
                **({"padded_vocab_size": self.padded_vocab_size} if self.padded_vocab_size else {})}


@dataclass(frozen=True)
class LayoutOptions:
    """A layout as a user states it (the ``--cfg.*parallel_config.*`` options, the API's ``layout=``): values left
    None are not given. ``resolve`` makes the ParallelLayout once the model's layer counts are known (no layer
    lists: every layer on one stage); for a checkpoint read off its shards, the values given are checked instead.
    ``make_vocab_size_divisible_by`` N (Megatron's option) pads the vocabulary to a multiple of N x tp_size;
    ``padded_vocab_size`` gives the padded rows themselves (what a checkpoint's shards hold)."""
    tp_size: int | None = None          # the fields and their order are ParallelLayout's
    llm_pp_layers: object = None
    vit_pp_layers: object = None
    vit_tp_size: int | None = None
    ep_size: int | None = None
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int | None = None

    @classmethod
    def of(cls, layout: "ParallelLayout | LayoutOptions | None", values: dict, prefix: str = "") -> "LayoutOptions":
        """``layout``, or the same values given one by one as keywords (``prefix`` + field name, taken out of
        ``values``): the API's convenience; not both."""
        given = {f.name: values.pop(prefix + f.name) for f in fields(cls) if prefix + f.name in values}
        if layout is not None and any(v is not None for v in given.values()):
            raise TypeError(f"give the layout as {prefix}layout= or as {prefix}tp_size= ... keywords, not both")
        if isinstance(layout, ParallelLayout):
            return cls(layout.tp_size, layout.llm_pp_layers, layout.vit_pp_layers, layout.vit_tp_size, layout.ep_size,
                       layout.padded_vocab_size)
        return layout if layout is not None else cls(**given)

    @property
    def constrains(self) -> bool:
        """Whether any value a checkpoint's shards must match is given (vit_tp_size alone never was checked)."""
        return any(v is not None for v in (self.tp_size, self.llm_pp_layers, self.vit_pp_layers, self.ep_size,
                                           self.padded_vocab_size, self.make_vocab_size_divisible_by))

    def over(self, found: ParallelLayout) -> "LayoutOptions":
        """These values, those not given taken from ``found`` (the vocabulary's rows too, unless padding is asked)."""
        given = {f.name: getattr(found, f.name) for f in fields(self)
                 if hasattr(found, f.name) and getattr(self, f.name) is None}
        if self.make_vocab_size_divisible_by is not None:
            given.pop("padded_vocab_size", None)
        return replace(self, **given)

    def resolve(self, llm_layers: int, vit_layers: int, prefix: str, vocab_size: int | None = None) -> ParallelLayout:
        """The ParallelLayout (tp 1, vision TP as tp, ep 1 and one stage where not given), its shape checked;
        the vocabulary padded as asked (``vocab_size``: the config's; no padding when it needs none)."""
        tp = _given(self.tp_size, 1)
        rows = self.padded_vocab_size or 0
        n = self.make_vocab_size_divisible_by
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise LayoutError(f"{prefix}.make_vocab_size_divisible_by: expected a positive integer, got {n!r}")
            if vocab_size is not None:
                rows = padded_vocab(vocab_size, n, tp)
        if vocab_size is not None and rows == vocab_size:
            rows = 0  # nothing padded
        return ParallelLayout.create(tp, self.llm_pp_layers, self.vit_pp_layers,
                                     _given(self.vit_tp_size, 0), ep_size=_given(self.ep_size, 1),
                                     llm_layers=llm_layers, vit_layers=vit_layers, padded_vocab_size=rows,
                                     prefix=prefix)


def _given(value, default):
    return default if value is None else value


def _fmt(lists) -> str:
    return "[" + ",".join("[" + ",".join(map(str, c)) + "]" for c in lists) + "]"
