"""Channel slices written inline in ``forward`` (``torch.split``, ``chunk``, ``narrow``,
``tensor_split``, ``x[:, a:b]``, uneven sizes included), owned by the engine instead of DepGraph.

DepGraph maps indices through splits by offsets it computes once, which go wrong after other
channel ops, and it cannot change the bounds the user's code slices with. Here each piece of a
channel slice is found by a first forward under a ``TorchFunctionMode`` and, while DepGraph traces,
routed through a parameter-free stand-in (``ChannelSlice``) that the graph treats as a barrier;
``kdprune.engine.links`` then links the groups on its two sides channel by channel (input channel
``a + j`` is piece channel ``j``). A slice is only prunable when its bounds follow the pruned
width: ``chunk`` and a ``split`` into equal parts by shape (the same position is removed from every
piece, so the parts stay equal), or bounds held in attributes of the module whose forward slices
(``self.splits``, ``self.width``, ``x[:, :self.oup]``), which the stand-in rewrites as channels
are removed (its ``kdprune_prune_inputs``), and which the structure log replays on load because
the rewrite is part of the ``prune_channels`` edit. Bounds written as literals cannot follow: the
engine's exactness check (``kdprune.engine.verify``) then keeps the group whole.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["SliceCall", "ChannelSlice", "SLICERS", "channel_pieces", "derive_sources", "slice_calls", "write_call",
           "write_rest"]

SLICERS = frozenset({
    torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk, torch.Tensor.narrow, torch.narrow,
    torch.Tensor.tensor_split, torch.tensor_split, torch.Tensor.__getitem__,
})
# the slicers whose pieces are equal by construction, computed from the width at run time
_EQUAL = frozenset({torch.Tensor.chunk, torch.chunk, torch.Tensor.tensor_split, torch.tensor_split})


@dataclass(frozen=True)
class SliceCall:
    """One channel-slicing call seen in the forward: its pieces ``[a, b)`` of the ``width`` input
    channels, whether the pieces must stay equal, and the owner attributes holding its bounds."""

    module: str  # innermost module whose forward sliced ("" = the model itself)
    op: str
    width: int
    pieces: tuple[tuple[int, int], ...]
    equal: bool  # pieces sized by the run-time width (chunk, split by shape): they must stay equal
    # ("start" | "stop" | "size" | "sizes" | "length", attribute name[, p, q]) bounds read from the owner
    # module: the attribute itself, or (derive_sources) attribute * p / q
    sources: tuple[tuple, ...] = ()

    def describe(self, piece: int) -> str:
        """A readable label for one piece, used as the stand-in's name."""
        a, b = self.pieces[piece]
        where = self.module or "the model's forward"
        return f"<channel slice in {where}: {self.op} [{a}:{b}] of {self.width}>"


def _dim(args: tuple, kwargs: dict, pos: int, default: int, ndim: int) -> int:
    d = kwargs.get("dim", args[pos] if len(args) > pos else default)
    return d + ndim if isinstance(d, int) and d < 0 else d


def channel_pieces(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[tuple[int, int], ...] | None:
    """The ``[a, b)`` channel ranges a slicing call returned, or None when it does not slice dim 1."""
    if func not in SLICERS or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 3:
        return None
    x = args[0]
    if func is torch.Tensor.__getitem__:
        idx = args[1] if len(args) > 1 else None
        if not (isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], slice)
                and idx[1] != slice(None) and idx[1].step in (None, 1)
                and all(i == slice(None) or i is Ellipsis for i in idx[2:])):
            return None
    elif _dim(args, kwargs, 1 if func in (torch.Tensor.narrow, torch.narrow) else 2, 0, x.dim()) != 1:
        return None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    pieces = []
    for o in outs:
        if (not isinstance(o, torch.Tensor) or o.dim() != x.dim() or o.shape[0] != x.shape[0]
                or o.shape[2:] != x.shape[2:] or (o.numel() and o.stride() != x.stride())):
            return None
        a = (o.storage_offset() - x.storage_offset()) // x.stride(1) if o.numel() else 0
        pieces.append((a, a + o.shape[1]))
    return tuple(pieces)


def _split_size(args: tuple, kwargs: dict) -> Any:
    """The size argument of a ``split`` call (an int or a list of sizes)."""
    return kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1] if len(args) > 1 else None))


def _int_attrs(owner: nn.Module | None) -> dict[str, int]:
    """The owner's public positive int attributes (where a forward keeps its slice bounds)."""
    return {k: v for k, v in (vars(owner) if owner is not None else {}).items()
            if not k.startswith("_") and type(v) is int and v > 0}


def _attr_holding(owner: nn.Module | None, value: Any) -> str | None:
    """The one int attribute of ``owner`` equal to ``value`` (None: none, or several: ambiguous)."""
    names = [k for k, v in _int_attrs(owner).items() if v == value] if type(value) is int else []
    return names[0] if len(names) == 1 else None


def _sources(func: Any, args: tuple, kwargs: dict, owner: nn.Module | None) -> tuple[tuple[str, str], ...]:
    """The owner's attributes that hold this call's bounds (matched by value)."""
    if owner is None:
        return ()
    lists = {k: v for k, v in vars(owner).items() if not k.startswith("_") and isinstance(v, (list, tuple))
             and v and all(type(i) is int for i in v)}

    found: list[tuple[str, str | None]] = []
    if func is torch.Tensor.__getitem__:
        s = args[1][1]
        found = [("start", _attr_holding(owner, s.start)), ("stop", _attr_holding(owner, s.stop))]
    elif func in (torch.Tensor.split, torch.split):
        size = _split_size(args, kwargs)
        if isinstance(size, (list, tuple)):
            names = [k for k, v in lists.items() if list(v) == list(size)]
            found = [("sizes", names[0] if len(names) == 1 else None)]
        else:
            found = [("size", _attr_holding(owner, size))]
    elif func in (torch.Tensor.narrow, torch.narrow):
        found = [("start", _attr_holding(owner, args[2] if len(args) > 2 else kwargs.get("start"))),
                 ("length", _attr_holding(owner, args[3] if len(args) > 3 else kwargs.get("length")))]
    return tuple((role, name) for role, name in found if name is not None)


def slice_call(func: Any, args: tuple, kwargs: dict, out: Any, module: str,
               owner: nn.Module | None) -> SliceCall | None:
    """The SliceCall a traced call is, or None when it is not a channel slice."""
    pieces = channel_pieces(func, args, kwargs, out)
    if pieces is None:
        return None
    sources = _sources(func, args, kwargs, owner)
    by_shape = func in (torch.Tensor.split, torch.split) and not sources and len({b - a for a, b in pieces}) == 1
    equal = (func in _EQUAL or by_shape or any(r == "size" for r, _ in sources)) and len(pieces) > 1
    op = getattr(func, "__name__", str(func)).strip("_")
    return SliceCall(module, op, int(args[0].shape[1]), pieces, equal, sources)


def write_rest(args: tuple) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """For ``base[:, a:b] = value`` (what ``base[:, :c] += x`` ends in) with the slice at one end of
    the channels: (the written ``[a, b)``, the rest of ``base``'s channels); None otherwise."""
    if len(args) < 3 or not isinstance(args[0], torch.Tensor) or not isinstance(args[2], torch.Tensor):
        return None
    base, idx, value = args[:3]
    if base.dim() < 3:
        return None
    view = base[idx]
    pieces = channel_pieces(torch.Tensor.__getitem__, (base, idx), {}, view)
    if pieces is None or len(pieces) != 1 or value.shape != view.shape:
        return None
    (a, b), c = pieces[0], base.shape[1]
    if a == 0 and 0 < b < c:
        return (a, b), (b, c)
    if b == c and 0 < a < c:
        return (a, b), (0, a)
    return None


def write_call(args: tuple, module: str, owner: nn.Module | None) -> SliceCall | None:
    """The rest of the channels of an in-place channel-slice write, as a one-piece SliceCall."""
    found = write_rest(args)
    if found is None:
        return None
    (a, b), rest = found
    s = args[1][1]
    bound = s.stop if a == 0 else s.start  # the rest starts where the write stops, or stops where it starts
    name = _attr_holding(owner, bound)
    sources = ((("start" if a == 0 else "stop"), name),) if name is not None else ()
    return SliceCall(module, "setitem", int(args[0].shape[1]), (rest,), False, sources)


class ChannelSlice(nn.Module):
    """Stand-in for one piece of a channel slice while DepGraph traces (a channel barrier whose
    two sides the engine links). Removing its input channels rewrites the owner's bound
    attributes, so that the user's forward slices the pruned width where it sliced the dense one."""

    kdprune_channel_barrier = True

    def __init__(self, call: SliceCall, piece: int, owner: nn.Module | None) -> None:
        super().__init__()
        self.call, self.piece = call, piece
        self._owner = (owner,)  # a tuple: the owner must not become a submodule of the stand-in
        self.kept = list(range(call.width))  # dense input channels still present, in order

    @property
    def bounds(self) -> tuple[int, int]:
        """This piece's ``[a, b)`` in the current (pruned) numbering of the input."""
        a, b = self.call.pieces[self.piece]
        return sum(c < a for c in self.kept), sum(c < b for c in self.kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.call.pieces[self.piece]
        # a copy, not a view: an in-place write into the piece (``out[:, :c] += x``) is traced as
        # an out-of-place one (see kdprune.engine.reshape._Route), which DepGraph can follow; one
        # op (index_select), so that no slice of DepGraph's own sits between the input and the stand-in
        return x.index_select(1, torch.arange(a, b, device=x.device))

    def kdprune_prune_inputs(self, idxs: list[int]) -> None:
        """Input channels ``idxs`` (current numbering) were removed: follow them in the owner's bounds."""
        drop = set(idxs)
        self.kept = [c for i, c in enumerate(self.kept) if i not in drop]
        owner = self._owner[0]
        a, b = self.bounds
        for role, name, *ratio in self.call.sources:
            if role == "sizes":
                sizes = list(getattr(owner, name))
                sizes[self.piece] = b - a
                setattr(owner, name, type(getattr(owner, name))(sizes))
                continue
            bound = {"start": a, "stop": b, "size": b - a, "length": b - a}[role]
            p, q = ratio or (1, 1)  # a derived bound (derive_sources): attribute * p / q
            setattr(owner, name, bound * q // p)


def slice_calls(records: list[tuple[SliceCall, nn.Module | None]]) -> list[ChannelSlice]:
    """One stand-in per piece of every recorded call, in call order."""
    return [ChannelSlice(c, p, owner) for c, owner in records for p in range(len(c.pieces))]


class _Found(Exception):
    """Stops a probing forward at the slice it looks for."""


class _ProbeSlice(TorchFunctionMode):
    """Reads the bound arguments of the ``k``-th channel slice (writes counted too) and stops."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.n, self.args = k, 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        hit = (write_rest(args) is not None if func is torch.Tensor.__setitem__
               else func in SLICERS and channel_pieces(func, args, kwargs, out) is not None)
        if hit:
            if self.n == self.k:
                self.args = (func, args, kwargs)
                raise _Found
            self.n += 1
        return out


def _bound(func: Any, args: tuple, kwargs: dict, role: str) -> Any:
    if role == "size":
        return _split_size(args, kwargs)
    s = args[1][1]
    return s.start if role == "start" else s.stop


def _probe_bound(model: nn.Module, x: torch.Tensor, k: int, role: str) -> Any:
    mode = _ProbeSlice(k)
    try:
        with torch.no_grad(), mode:
            model(x)
    except _Found:
        return _bound(*mode.args, role)
    except Exception:  # noqa: BLE001 - the perturbed attribute broke the forward before the slice
        return None
    return None


def derive_sources(model: nn.Module, x: torch.Tensor, records: list[tuple[SliceCall, nn.Module | None]]
                   ) -> list[tuple[SliceCall, nn.Module | None]]:
    """Bounds computed from an owner attribute (``split(self.expand_chs // 2)``): for a split size or
    a slice bound no attribute holds as it is, each int attribute of the owner is doubled in turn and
    the same call probed; a bound that doubles with it is ``attribute * p / q`` (q <= 8), rewritten
    through that ratio. The attribute is restored after each probe."""
    out = []
    for k, (call, owner) in enumerate(records):
        (a, b), width = call.pieces[0], call.width
        roles = {"split": ("size",), "getitem": ("start",) * (a > 0) + ("stop",) * (b < width)}.get(call.op, ())
        have = {r for r, *_ in call.sources}
        seen = {"size": b - a, "start": a, "stop": b}  # the bound each role had in the recorded call
        found = [s for r in roles if r not in have for s in [_derive(model, x, k, r, owner, seen[r])] if s is not None]
        out.append((replace(call, sources=call.sources + tuple(found)) if found else call, owner))
    return out


def _derive(model: nn.Module, x: torch.Tensor, k: int, role: str, owner: nn.Module | None, base: int
            ) -> tuple | None:
    if owner is None or base <= 0:
        return None
    for name, value in _int_attrs(owner).items():
        q = next((q for q in range(1, 9) if (base * q) % value == 0), None)
        if q is None or base * q // value > 8:
            continue  # not attribute * p / q with small p, q: not worth a probing forward
        setattr(owner, name, 2 * value)
        try:
            moved = _probe_bound(model, x, k, role)
        finally:
            setattr(owner, name, value)
        if moved == 2 * base:
            return (role, name, base * q // value, q)  # bound = attribute * p / q
    return None
