"""OME-Zarr (NGFF 0.4 and 0.5) image metadata: a level's place and voxel size, and chunkflow's own.

An OME-Zarr *image* is a zarr group whose attributes hold ``multiscales`` (NGFF 0.4, zarr v2,
in ``.zattrs``; NGFF 0.5, zarr v3, under ``attributes.ome``). ``multiscales[0].datasets[N]`` is
resolution level N: an array at ``path`` with ``coordinateTransformations`` (a ``scale`` and an
optional ``translation``), followed by the multiscale's own transforms if it has any.

chunkflow maps level N onto its voxel grid the way it writes its own output: voxel size
(``resolution``, ZYX, nm) is the combined scale converted from the axes' units, and the voxel
offset is ``translation / scale`` per axis, which must be a whole number. A level whose
translation is a fraction of its voxel (pixel-centre pyramids, where level N sits
``(factor - 1) / 2`` base voxels from level 0) is refused rather than rounded: the output would
be placed a fraction of a voxel away from the input in every viewer.

Axes may be ``z,y,x``, ``c,z,y,x`` or either with a leading ``t`` of size 1; other layouts are
refused, naming the axes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from chunkflow.bbox import Vec
from chunkflow.errors import StorageError

log = logging.getLogger(__name__)

#: NGFF versions chunkflow reads; it writes 0.5
VERSIONS = ("0.4", "0.5")
WRITTEN_VERSION = "0.5"

#: nanometres per unit: NGFF's space units, plus common abbreviations
_NM_PER_UNIT = {
    "angstrom": 0.1, "attometer": 1e-9, "centimeter": 1e7, "decimeter": 1e8, "exameter": 1e27,
    "femtometer": 1e-6, "foot": 3.048e8, "gigameter": 1e18, "hectometer": 1e11, "inch": 2.54e7,
    "kilometer": 1e12, "megameter": 1e15, "meter": 1e9, "micrometer": 1e3, "mile": 1.609344e12,
    "millimeter": 1e6, "nanometer": 1.0, "parsec": 3.0856775814913673e25, "petameter": 1e24,
    "picometer": 1e-3, "terameter": 1e21, "yard": 9.144e8, "yoctometer": 1e-15, "yottameter": 1e33,
    "zeptometer": 1e-12, "zettameter": 1e30,
    "nm": 1.0, "um": 1e3, "\u00b5m": 1e3, "\u03bcm": 1e3, "micron": 1e3, "mm": 1e6, "\u00c5": 0.1,
}
_SPATIAL = ("z", "y", "x")


def fmt_number(value: float) -> str:
    """``40`` for 40.0, ``0.5`` for 0.5: how levels and offsets appear in messages."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def fmt_resolution(resolution: Sequence[float]) -> str:
    """ZYX voxel size as ``40x8x8``."""
    return "x".join(fmt_number(r) for r in resolution)


@dataclass(frozen=True)
class Layout:
    """Where the time, channel and spatial axes of an array are."""

    names: tuple[str, ...]
    time: int | None = None
    channel: int | None = None

    @property
    def lead(self) -> tuple:
        """The index that selects C (or nothing) before the spatial slices: ``t`` is fixed at 0."""
        lead: list = []
        if self.time is not None:
            lead.append(0)
        if self.channel is not None:
            lead.append(slice(None))
        return tuple(lead)


@dataclass(frozen=True)
class Level:
    """One dataset of a multiscale: its path and combined transform, per array axis."""

    index: int
    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class LevelGeometry:
    """What a :class:`~chunkflow.storage.zarr_volume.ZarrVolume` needs to place a level."""

    offset: Vec
    resolution: tuple[float, float, float]
    layout: Layout


@dataclass(frozen=True)
class Multiscale:
    """``multiscales[0]`` of an OME-Zarr image, parsed and checked."""

    url: str
    version: str
    layout: Layout
    nm_per_unit: tuple[float, float, float]
    unit_names: tuple[str, str, str]
    levels: tuple[Level, ...]

    def resolution(self, level: Level) -> tuple[float, float, float]:
        """ZYX voxel size in nm (values already in nm are kept bit-exact)."""
        spatial = level.scale[-3:]
        return tuple(s if f == 1.0 else float(f"{s * f:.12g}")  # type: ignore[return-value]
                     for s, f in zip(spatial, self.nm_per_unit))

    def describe_levels(self) -> str:
        return ", ".join(f"{lv.index} ({fmt_resolution(self.resolution(lv))} nm)" for lv in self.levels)

    def level(self, mip: int) -> Level:
        """``datasets[mip]``, or a refusal naming the levels there are."""
        check_mip(mip)
        if mip >= len(self.levels):
            raise StorageError(f"--mip {mip}: {self.url} has no such level; its levels are {self.describe_levels()}")
        return self.levels[mip]

    def index_of(self, path: str) -> int | None:
        """The level whose dataset path is ``path`` (relative to the image group), if any."""
        wanted = _norm_path(path)
        for level in self.levels:
            if _norm_path(level.path) == wanted:
                return level.index
        return None

    def geometry(self, mip: int, shape: Sequence[int]) -> LevelGeometry:
        """Offset (voxels of that level), resolution and axes of ``datasets[mip]`` with ``shape``."""
        level = self.level(mip)
        names = ",".join(self.layout.names)
        if len(shape) != len(self.layout.names):
            raise StorageError(f"{self.url} level {mip} ({level.path}) has {len(shape)} dimensions "
                               f"but the image's axes are {names}")
        if self.layout.time is not None and shape[self.layout.time] != 1:
            raise StorageError(f"{self.url} has axes {names} with {shape[self.layout.time]} time points; "
                               "chunkflow reads one: axes z,y,x or c,z,y,x, or a t axis of size 1")
        offset = []
        for axis, scale, translation in zip(_SPATIAL, level.scale[-3:], level.translation[-3:]):
            ratio = translation / scale
            whole = round(ratio)
            if abs(ratio - whole) > 1e-6:
                raise StorageError(self._fractional(level, axis, translation, ratio))
            offset.append(int(whole))
        return LevelGeometry(Vec(offset), self.resolution(level), self.layout)

    def _fractional(self, level: Level, axis: str, translation: float, ratio: float) -> str:
        unit = self.unit_names[_SPATIAL.index(axis)] or "units"
        text = (f"{self.url} level {level.index} ({fmt_resolution(self.resolution(level))} nm): translation "
                f"{translation:g} {unit} on the {axis} axis is {ratio:g} of its voxels, not a whole number; "
                "chunkflow places voxels on an integer grid and would misplace the output")
        base = self.levels[0]
        i = _SPATIAL.index(axis) - 3
        factor = level.scale[i] / base.scale[i]
        shift = (level.translation[i] - base.translation[i]) / base.scale[i]
        if level.index and factor > 1 and math.isclose(shift, (factor - 1) / 2, rel_tol=1e-6, abs_tol=1e-9):
            text += (" (a pixel-centre pyramid, as ome-zarr-py and ngff-zarr write: read level 0, "
                     "or give the level a translation in whole voxels)")
        return text


def check_mip(mip: Any) -> None:
    """Refuse a level number that is not a non-negative integer."""
    if isinstance(mip, bool) or not isinstance(mip, int) or mip < 0:
        raise StorageError(f"--mip {mip!r} is not a resolution level (0, 1, 2, ...)")


def _norm_path(path: str) -> str:
    parts = [p for p in str(path).split("/") if p not in ("", ".")]
    return "/".join(parts)


def find_multiscales(attrs: dict) -> tuple[dict, str | None] | None:
    """``(multiscales[0], version)`` from a group's attributes, or None if it is not an image."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        return _first(ome["multiscales"]), ome.get("version")
    if "multiscales" in attrs:
        first = _first(attrs["multiscales"])
        return first, first.get("version") if isinstance(first, dict) else None
    return None


def _first(multiscales: Any) -> Any:
    return multiscales[0] if isinstance(multiscales, list) and multiscales else multiscales


def parse_multiscale(attrs: dict, url: str, zarr_format: int) -> Multiscale | None:
    """Parse an image group's metadata; None if the group has no ``multiscales``."""
    found = find_multiscales(attrs)
    if found is None:
        return None
    ms, version = found
    if not isinstance(ms, dict) or not isinstance(ms.get("datasets"), list) or not ms["datasets"]:
        raise StorageError(f"{url}: OME-Zarr multiscales metadata has no datasets")
    version = str(version) if version is not None else ("0.5" if zarr_format == 3 else "0.4")
    if not version.startswith(VERSIONS):
        raise StorageError(f"{url} is OME-Zarr {version}; chunkflow reads versions {', '.join(VERSIONS)}")
    layout, units = _layout(ms.get("axes"), url)
    nm_per_unit = tuple(_nm_per_unit(u, url) for u in units)
    ndim = len(layout.names)
    outer = _transforms(ms.get("coordinateTransformations") or [], ndim, url, "multiscale")
    levels = []
    for index, dataset in enumerate(ms["datasets"]):
        if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str):
            raise StorageError(f"{url}: OME-Zarr dataset {index} has no path")
        what = f"dataset {index} ({dataset['path']})"
        inner = _transforms(dataset.get("coordinateTransformations") or [], ndim, url, what)
        scale, translation = _combine(inner + outer, ndim)
        if any(s <= 0 for s in scale[-3:]):
            raise StorageError(f"{url}: OME-Zarr {what} has scale {list(scale)}; spatial scales must be positive")
        levels.append(Level(index, dataset["path"], scale, translation))
    return Multiscale(url, version, layout, nm_per_unit, units, tuple(levels))  # type: ignore[arg-type]


def _layout(axes: Any, url: str) -> tuple[Layout, tuple[str, str, str]]:
    if not isinstance(axes, list) or not axes:
        raise StorageError(f"{url}: OME-Zarr multiscales metadata has no axes")
    names, kinds, units = [], [], []
    for axis in axes:
        if isinstance(axis, str):  # NGFF 0.3 spelling
            axis = {"name": axis}
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            raise StorageError(f"{url}: OME-Zarr axis {axis!r} has no name")
        names.append(axis["name"])
        kinds.append(axis.get("type") or {"t": "time", "c": "channel"}.get(axis["name"].lower(), "space"))
        units.append(axis.get("unit") or "")
    shown = ",".join(names)
    space = [i for i, k in enumerate(kinds) if k == "space"]
    rest = [k for k in kinds if k != "space"]
    ok_lead = rest in ([], ["channel"], ["time"], ["time", "channel"])
    ok_space = len(space) == 3 and space == list(range(len(kinds) - 3, len(kinds))) and \
        [names[i].lower() for i in space] == list(_SPATIAL)
    if not (ok_lead and ok_space):
        raise StorageError(f"{url} has axes {shown}; chunkflow reads z,y,x or c,z,y,x "
                           "(optionally after a t axis of size 1)")
    time = kinds.index("time") if "time" in kinds else None
    channel = kinds.index("channel") if "channel" in kinds else None
    spatial_units = tuple(units[i] for i in space)
    return Layout(tuple(names), time, channel), spatial_units  # type: ignore[return-value]


def _nm_per_unit(unit: str, url: str) -> float:
    if not unit:
        log.debug("%s: a spatial axis has no unit; its scale is taken as nanometers", url)
        return 1.0
    factor = _NM_PER_UNIT.get(unit, _NM_PER_UNIT.get(unit.lower()))
    if factor is None:
        raise StorageError(f"{url}: axis unit {unit!r} is not a length unit chunkflow knows "
                           "(nanometer, micrometer, millimeter, angstrom, meter, ...)")
    return factor


def _transforms(items: Any, ndim: int, url: str, what: str) -> list[tuple[str, tuple[float, ...]]]:
    out = []
    for item in items if isinstance(items, list) else [items]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "identity":
            continue
        if kind not in ("scale", "translation") or "path" in item:
            raise StorageError(f"{url}: OME-Zarr {what} has a coordinate transformation chunkflow does not "
                               f"read ({kind or item!r}); it reads inline scale and translation")
        values = item.get(kind)
        if not isinstance(values, list) or len(values) != ndim or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise StorageError(f"{url}: OME-Zarr {what} {kind} {values!r} is not {ndim} numbers, one per axis")
        out.append((kind, tuple(float(v) for v in values)))
    return out


def _combine(transforms: list[tuple[str, tuple[float, ...]]], ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fold a chain of scales and translations into one ``x -> scale * x + translation``."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for kind, values in transforms:
        if kind == "scale":
            scale = [a * b for a, b in zip(scale, values)]
            translation = [a * b for a, b in zip(translation, values)]
        else:
            translation = [a + b for a, b in zip(translation, values)]
    return tuple(scale), tuple(translation)


def image_attributes(name: str, resolution: Sequence[float], offset: Sequence[int]) -> dict:
    """NGFF 0.5 group attributes for chunkflow's one-level C,Z,Y,X output (dataset ``"0"``)."""
    space = [{"name": n, "type": "space", "unit": "nanometer"} for n in _SPATIAL]
    return {
        "ome": {
            "version": WRITTEN_VERSION,
            "multiscales": [{
                "name": name,
                "axes": [{"name": "c", "type": "channel"}, *space],
                "datasets": [{
                    "path": "0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, *(float(r) for r in resolution)]},
                        {"type": "translation",
                         "translation": [0.0, *(float(o) * float(r) for o, r in zip(offset, resolution))]},
                    ],
                }],
            }],
        }
    }
