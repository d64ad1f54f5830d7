"""Immutable 3D vectors and half-open bounding boxes (ZYX in memory).

Names and keys follow the Neuroglancer precomputed chunk-name convention
``x0-x1_y0-y1_z0-z1`` (global voxel coordinates, half-open), while every tuple,
shape and array in memory is ZYX.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from chunkflow.errors import GeometryError

_INT = r"(0|-?[1-9][0-9]*)"  # ASCII, no leading zeros: one spelling per number
_NAME_RE = re.compile(rf"{_INT}-{_INT}_{_INT}-{_INT}_{_INT}-{_INT}", re.ASCII)


class Vec(tuple):
    """An immutable ZYX integer vector with element-wise arithmetic."""

    def __new__(cls, *values: int | Iterable[int]) -> "Vec":
        if len(values) == 1:
            if type(values[0]) is cls:
                return values[0]  # immutable: the same vector
            if not isinstance(values[0], int) and hasattr(values[0], "__iter__"):
                values = tuple(values[0])
        if len(values) == 3 and type(values[0]) is int and type(values[1]) is int and type(values[2]) is int:
            return super().__new__(cls, values)
        items = tuple(int(v) for v in values)
        if len(items) != 3:
            raise GeometryError(f"a Vec has 3 components (z, y, x), got {len(items)}: {items}")
        return super().__new__(cls, items)

    @classmethod
    def parse(cls, text: str | Sequence[int] | int, what: str = "size") -> "Vec":
        """Parse ``"16,128,128"`` (ZYX), a sequence or a single int (isotropic)."""
        if isinstance(text, bool) or (not isinstance(text, (str, int)) and hasattr(text, "__iter__") and any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in text)):
            raise GeometryError(f"{what} {_shown(text)} is not three integers z,y,x such as 16,128,128")
        if isinstance(text, int):
            return cls(text, text, text)
        if isinstance(text, str):
            parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
            try:
                return cls(int(p) for p in parts)
            except ValueError:
                raise GeometryError(f"{what} {text!r} is not three integers z,y,x such as 16,128,128") from None
        try:
            return cls(text)
        except (TypeError, ValueError):
            raise GeometryError(f"{what} {_shown(text)} is not three integers z,y,x such as 16,128,128") from None

    def __add__(self, other) -> "Vec":  # type: ignore[override]
        o = _as3(other)
        return _vec(self[0] + o[0], self[1] + o[1], self[2] + o[2])

    __radd__ = __add__

    def __sub__(self, other) -> "Vec":
        o = _as3(other)
        return _vec(self[0] - o[0], self[1] - o[1], self[2] - o[2])

    def __rsub__(self, other) -> "Vec":
        o = _as3(other)
        return _vec(o[0] - self[0], o[1] - self[1], o[2] - self[2])

    def __mul__(self, other) -> "Vec":  # type: ignore[override]
        o = _as3(other)
        return _vec(self[0] * o[0], self[1] * o[1], self[2] * o[2])

    __rmul__ = __mul__

    def __floordiv__(self, other) -> "Vec":
        o = _as3(other)
        return _vec(self[0] // o[0], self[1] // o[1], self[2] // o[2])

    def __mod__(self, other) -> "Vec":
        o = _as3(other)
        return _vec(self[0] % o[0], self[1] % o[1], self[2] % o[2])

    def __neg__(self) -> "Vec":
        return _vec(-self[0], -self[1], -self[2])

    def prod(self) -> int:
        return self[0] * self[1] * self[2]

    def xyz(self) -> tuple[int, int, int]:
        return (self[2], self[1], self[0])

    def __repr__(self) -> str:
        return f"Vec({self[0]}, {self[1]}, {self[2]})"


def zyx_text(values: Iterable[float], *, floats: bool = False) -> str:
    """A ZYX size, offset or index as messages show it, ``16,128,128``. ``floats=True`` keeps
    fractions (``4.5,8,8``: voxel sizes in nm); otherwise each value is shown as an integer."""
    if floats:
        return ",".join(f"{float(v):g}" for v in values)
    return ",".join(str(int(v)) for v in values)


def _shown(value) -> str:
    """A parsed command-line value as the user typed it (Fire turns ``8.5,64,64`` into a tuple)."""
    if isinstance(value, (tuple, list)):
        return repr(",".join(str(v) for v in value))
    return repr(value)


def _vec(z, y, x) -> Vec:
    """A Vec of three results of arithmetic: plain ints taken as they are (the common case, without
    the checks and conversions of ``Vec()``), anything else through ``Vec()``."""
    if type(z) is int and type(y) is int and type(x) is int:
        return tuple.__new__(Vec, (z, y, x))
    return Vec(z, y, x)


def _as3(value) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    items = tuple(value)
    if len(items) != 3:
        raise GeometryError(f"a Vec has 3 components (z, y, x), got {len(items)}: {items}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class Bbox:
    """A half-open ZYX box ``[start, stop)`` in global voxel coordinates."""

    start: Vec
    stop: Vec

    def __post_init__(self) -> None:
        if type(self.start) is not Vec:
            object.__setattr__(self, "start", Vec(self.start))
        if type(self.stop) is not Vec:
            object.__setattr__(self, "stop", Vec(self.stop))

    @classmethod
    def from_shape(cls, start: Sequence[int], shape: Sequence[int]) -> "Bbox":
        s = Vec(start)
        return cls(s, s + Vec(shape))

    @classmethod
    def from_name(cls, name: str) -> "Bbox":
        """Parse ``x0-x1_y0-y1_z0-z1`` strictly: ASCII integers without leading zeros (so a name
        has one spelling and names of the same box are equal strings), start < stop."""
        m = _NAME_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise GeometryError(f"{name!r} is not a box name of the form x0-x1_y0-y1_z0-z1 (integers)")
        x0, x1, y0, y1, z0, z1 = (int(g) for g in m.groups())
        box = cls(Vec(z0, y0, x0), Vec(z1, y1, x1))
        if box.is_empty():
            raise GeometryError(f"box name {name!r} is empty: each start must be below its stop")
        return box

    @property
    def name(self) -> str:
        (z0, y0, x0), (z1, y1, x1) = self.start, self.stop
        return f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"

    @property
    def shape(self) -> Vec:
        (z0, y0, x0), (z1, y1, x1) = self.start, self.stop
        return _vec(max(0, z1 - z0), max(0, y1 - y0), max(0, x1 - x0))

    @property
    def size(self) -> int:
        return self.shape.prod()

    def is_empty(self) -> bool:
        return any(b <= a for a, b in zip(self.start, self.stop))

    def z_slabs(self, step: int) -> Iterator["Bbox"]:
        """This box cut along z into slabs ``step`` planes thick (the last may be thinner)."""
        step = max(1, int(step))
        for z in range(self.start[0], self.stop[0], step):
            yield Bbox(Vec(z, self.start[1], self.start[2]), Vec(min(z + step, self.stop[0]), self.stop[1], self.stop[2]))

    def intersect(self, other: "Bbox") -> "Bbox":
        start = Vec(max(a, b) for a, b in zip(self.start, other.start))
        stop = Vec(min(a, b) for a, b in zip(self.stop, other.stop))
        return Bbox(start, stop)

    def contains(self, other: "Bbox") -> bool:
        return all(a <= b for a, b in zip(self.start, other.start)) and all(
            a >= b for a, b in zip(self.stop, other.stop)
        )

    def contains_point(self, point: Sequence[int]) -> bool:
        return all(a <= p < b for a, p, b in zip(self.start, point, self.stop))

    def grow(self, margin: Sequence[int] | int) -> "Bbox":
        m = Vec(_as3(margin))
        return Bbox(self.start - m, self.stop + m)

    def translate(self, offset: Sequence[int]) -> "Bbox":
        o = Vec(offset)
        return Bbox(self.start + o, self.stop + o)

    def slices(self, within: "Bbox | None" = None) -> tuple[slice, slice, slice]:
        """Slices selecting this box from an array that covers ``within``."""
        origin = within.start if within is not None else Vec(0, 0, 0)
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, origin))  # type: ignore[return-value]

    def __str__(self) -> str:
        return self.name
