"""Pipeline schedules as data: which forwards and backwards each pipeline rank runs, in which order, and where
its point-to-point transfers go between them. Pure Python (no torch), the same on every rank.

Units. Positions ``0..last`` (``last``: the last LLM position) are the units of work, each on pp rank
``pos % pp``; at pp = 1 all positions are one unit (their autograd graph is one). ``F(m, u)`` is micro-batch
``m``'s forward through unit ``u``, ``B(m, u)`` its backward.

Orders (:func:`compute_order`):

- ``sequential``: per micro-batch, its forwards, then its backwards (one micro-batch in flight);
- ``gpipe``: every micro-batch's forwards, then every backward (all micro-batches in flight);
- ``1f1b``: Megatron's non-interleaved 1F1B: rank ``s`` runs ``pp - s - 1`` warm-up forwards, then alternates one
  forward and one backward, then the cool-down backwards, so at most ``pp - s`` micro-batches are in flight on
  it. With virtual pipeline chunks (VPP) it is Megatron's interleaved 1F1B: forwards in groups of ``pp``
  micro-batches chunk by chunk, backwards the same with the chunks reversed, ``(pp - s - 1) * 2 + (vpp - 1) * pp``
  warm-up forwards. At pp = 1 it is ``sequential``.

Every order runs each unit's backwards in micro-batch order 0, 1, 2, ..., so every parameter's ``.grad`` adds
the micro-batches' gradients in the same order as ``sequential``: results are bit-identical.

Transfers (:func:`programs`). Stages exchange variable-shape tensors with blocking sends and receives (a header,
then the tensors), and a blocking send may wait for its receive (NCCL and gloo match a pair's transfers in the
order both post them). So the transfers are not put "right after the compute" on each side, which deadlocks
(stage s sends F(k)'s output while stage s + 1 sends B(j)'s input gradient). Instead one global order of
events is built, and each rank runs its own events of it in that order: every transfer is one event that both
of its ranks run at the same point of the global order, so no rank can wait on a transfer that the other has
not reached yet or passed by (deadlock-free by construction; ``tests/test_pipeline_schedule.py`` also plays
the programs with blocking semantics). The global order comes from a timing model (forward 1, backward 2):
computes at their start times, each transfer just before the compute that needs it, which is where
Megatron's combined send-and-receive ops put them (the forward output of stage s goes to stage s + 1 when
stage s + 1 has sent its backward gradient back).
"""
from __future__ import annotations

import functools

SCHEDULES = ("sequential", "gpipe", "1f1b")
COST = {"F": 1, "B": 2}  # the timing model of the global order: a backward about twice a forward


def units(pp: int, last: int) -> list[list[int]]:
    """The positions of each unit: one per position, all in one at pp = 1."""
    return [list(range(last + 1))] if pp == 1 else [[p] for p in range(last + 1)]


def compute_order(schedule: str, pp: int, vpp: int, n_micro: int, n_units: int, rank: int, extra: int = 0
                  ) -> list[tuple]:
    """Rank ``rank``'s forwards and backwards, ("F" | "B", micro-batch, unit), in the order it runs them;
    ``extra``: warm-up forwards added to interleaved 1F1B's (see :func:`warmup_extra`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    mine = [u for u in range(n_units) if u % pp == rank]
    if schedule == "sequential" or (schedule == "1f1b" and pp == 1):
        return [op for m in range(n_micro) for op in [("F", m, u) for u in mine] + [("B", m, u) for u in mine[::-1]]]
    if schedule == "gpipe":
        return [("F", m, u) for m in range(n_micro) for u in mine] + \
               [("B", m, u) for m in range(n_micro) for u in mine[::-1]]
    if vpp == 1:
        fwd = [("F", m, u) for m in range(n_micro) for u in mine]
        bwd = [("B", m, u) for m in range(n_micro) for u in mine]
        warm = min(pp - rank - 1, n_micro)
    else:  # interleaved: micro-batches in groups of pp, chunk by chunk (units past ``last`` are left out below)
        groups = [range(g, min(g + pp, n_micro)) for g in range(0, n_micro, pp)]
        fwd = [("F", m, v * pp + rank) for grp in groups for v in range(vpp) for m in grp]
        bwd = [("B", m, v * pp + rank) for grp in groups for v in reversed(range(vpp)) for m in grp]
        warm = min((pp - rank - 1) * 2 + (vpp - 1) * pp + extra, len(fwd))
    order = fwd[:warm]
    for f, b in zip(fwd[warm:], bwd):
        order += [f, b]
    order += bwd[len(fwd) - warm:]
    return [op for op in order if op[2] < n_units]


def _deps(op: tuple, n_units: int) -> list[tuple]:
    """The computes ``op`` needs: a forward the previous unit's forward; a backward its own forward and the next
    unit's backward."""
    kind, m, u = op
    if kind == "F":
        return [("F", m, u - 1)] if u > 0 else []
    return [("F", m, u)] + ([("B", m, u + 1)] if u + 1 < n_units else [])


def start_times(orders: list[list[tuple]], n_units: int) -> dict[tuple, int]:
    """Each compute's start in the timing model: when its rank is free and what it needs has finished. Raises
    when the orders cannot all run (a rank waits on a compute that waits on it)."""
    start: dict[tuple, int] = {}
    finish: dict[tuple, int] = {}
    free, idx = [0] * len(orders), [0] * len(orders)
    while True:
        moved = False
        for r, order in enumerate(orders):
            while idx[r] < len(order):
                op = order[idx[r]]
                deps = _deps(op, n_units)
                if any(d not in finish for d in deps):
                    break
                start[op] = max([free[r]] + [finish[d] for d in deps])
                finish[op] = free[r] = start[op] + COST[op[0]]
                idx[r] += 1
                moved = True
        if all(i == len(o) for i, o in zip(idx, orders)):
            return start
        if not moved:
            stuck = {r: order[idx[r]] for r, order in enumerate(orders) if idx[r] < len(order)}
            raise RuntimeError(f"pipeline schedule cannot run: ranks wait on each other at {stuck}")


def warmup_extra(pp: int, vpp: int, n_micro: int, n_units: int) -> int:
    """Interleaved 1F1B needs no extra warm-up when pp divides the micro-batch count (Megatron's condition for
    it). Otherwise the last, partial group of micro-batches can make the ranks' orders wait on each other;
    then every rank's warm-up is lengthened by the least count that runs (at most up to GPipe's order)."""
    for extra in range(n_micro * vpp + 1):
        try:
            start_times([compute_order("1f1b", pp, vpp, n_micro, n_units, r, extra) for r in range(pp)], n_units)
            return extra
        except RuntimeError:
            continue
    raise RuntimeError(f"no interleaved 1F1B order for pp {pp}, vpp {vpp}, {n_micro} micro-batches")


@functools.lru_cache(maxsize=16)
def programs(schedule: str, pp: int, vpp: int, n_micro: int, n_units: int) -> tuple[tuple[tuple, ...], ...]:
    """Every pp rank's program: its computes ("F" | "B", m, u) and transfers ("send" | "recv", what, m, u, peer
    pp rank), where ("act", m, u) is the input of F(m, u) (unit u - 1's output) and ("grad", m, u) the output
    gradient of B(m, u) (unit u + 1's input gradient). The projections of one global order (module docstring)."""
    extra = warmup_extra(pp, vpp, n_micro, n_units) if schedule == "1f1b" and vpp > 1 and pp > 1 else 0
    orders = [compute_order(schedule, pp, vpp, n_micro, n_units, r, extra) for r in range(pp)]
    start = start_times(orders, n_units)
    events = []  # (time, 0 transfer / 1 compute, tie-break, event)
    for op, t in start.items():
        kind, m, u = op
        events.append((t, 1, (u % pp,), ("compute", op)))
        if kind == "F" and u > 0:  # at equal times a gradient goes first: its receiver waits on it anyway
            events.append((t, 0, (1, m, u), ("act", m, u, (u - 1) % pp, u % pp)))
        if kind == "B" and u + 1 < n_units:
            events.append((t, 0, (0, m, u), ("grad", m, u, (u + 1) % pp, u % pp)))
    progs: list[list[tuple]] = [[] for _ in range(pp)]
    for *_, ev in sorted(events, key=lambda e: e[:3]):
        if ev[0] == "compute":
            progs[ev[1][2] % pp].append(ev[1])
        else:
            what, m, u, src, dst = ev
            progs[src].append(("send", what, m, u, dst))
            progs[dst].append(("recv", what, m, u, src))
    return tuple(tuple(p) for p in progs)


def peak_in_flight(order: list[tuple]) -> int:
    """The most forward contexts (micro-batch, unit) an order holds at once: forwards run, backwards not yet."""
    held = peak = 0
    for kind, *_ in order:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak
