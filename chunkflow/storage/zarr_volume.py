"""zarr volumes: OME-Zarr images (NGFF 0.4 and 0.5) and plain C,Z,Y,X arrays.

Three kinds of location open as a :class:`ZarrVolume`:

* an **OME-Zarr image group** (``ome_zarr.py``): ``mip`` picks ``multiscales[0].datasets[mip]``;
  its bbox and resolution come from the level's ``coordinateTransformations``;
* one **level of an image** given directly (``image.zarr/0``): the parent group's metadata
  places it; ``mip`` must be 0;
* a **plain array**, chunkflow's format before OME-Zarr output: ``voxel_offset`` and
  ``resolution`` attributes (ZYX); ``mip`` must be 0.

A 3D (Z,Y,X) array is read and written as one channel. The storage unit used for write
alignment is the shard shape when the array is sharded (:attr:`Volume.shard_size`), else the
chunk shape: whole units only, so no two tasks ever read-modify-write the same object.

New volumes (:meth:`ZarrVolume.create`) are OME-Zarr 0.5 images with one level, array ``"0"``
(``dimension_names`` c,z,y,x), which also carries chunkflow's own attributes (``voxel_offset``,
``resolution``, ``layer_type``). The array is created before the group's metadata, so a
concurrent creator that sees the group half-written still finds the array.
``compression`` is one of :data:`ZARR_COMPRESSIONS`; ``"default"`` is zarr's own default
(zstd, lossless), ``"none"`` stores chunks raw.

``gs://`` locations go through gcsfs. Against an emulator (``STORAGE_EMULATOR_HOST``
set) gcsfs must be imported with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (its
experimental gRPC/HNS layer does not talk to fake-gcs-server) and uses anonymous
credentials; this module sets both when the emulator variable is present and gcsfs
is not yet imported.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import StorageError, one_line
from chunkflow.storage import ome_zarr as ome
from chunkflow.storage.local_io import read_json_file
from chunkflow.storage.volumes import CLAIMS_KEY, Volume

log = logging.getLogger(__name__)

_DEFAULT_RESOLUTION = (1.0, 1.0, 1.0)
#: ``--output-compression`` values for zarr outputs
ZARR_COMPRESSIONS = ("default", "none", "zstd", "blosc", "gzip")
#: how far up from a level path to look for its image group (``image.zarr/scale0/image``)
_PARENT_DEPTH = 3


def zarr_compressions(dtype: Any = None, num_channels: int | None = None) -> tuple[str, ...]:
    """The output compressions a new zarr volume can be created with (any dtype and channel count)."""
    return ZARR_COMPRESSIONS


def check_zarr_compression(compression: Any, dtype: Any = None, num_channels: int | None = None) -> None:
    """Refuse, in one line naming the valid values, an output compression zarr does not offer
    (:class:`StorageError`); nothing is written. Same signature as the precomputed check."""
    if not isinstance(compression, str) or compression not in ZARR_COMPRESSIONS:
        raise StorageError(f"output compression {compression!r} is not available for zarr volumes; "
                           f"valid: {', '.join(ZARR_COMPRESSIONS)}")


def zarr_compressors(compression: str) -> list | None:
    """zarr v3 compressors for a ``compression`` name; a name not in :data:`ZARR_COMPRESSIONS` is refused."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    check_zarr_compression(compression)
    return {"default": "auto", "none": None, "zstd": [ZstdCodec()], "blosc": [BloscCodec()],
            "gzip": [GzipCodec()]}[compression]


def _store(location: str, read_only: bool = False):
    """A zarr store for a local path or an fsspec URL (``gs://``)."""
    import zarr.storage

    if "://" in location:
        options: dict[str, Any] = {}
        if location.startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST"):
            if "gcsfs" not in sys.modules:
                os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            options["token"] = "anon"
        return zarr.storage.FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    return zarr.storage.LocalStore(location, read_only=read_only)


def _parents(location: str) -> list[tuple[str, str]]:
    """``(ancestor, path below it)`` for the few folders above ``location``, nearest first
    (never the filesystem root, nor a bucket)."""
    loc = location.rstrip("/")
    head, rest, least = "", loc, 1
    if "://" in loc:
        scheme, rest = loc.split("://", 1)
        head, least = f"{scheme}://", 2
    parts = rest.split("/")
    out = []
    for depth in range(1, min(_PARENT_DEPTH, len(parts)) + 1):
        above = parts[:-depth]
        if len(above) < least or not any(above):
            break
        out.append((head + "/".join(above), "/".join(parts[-depth:])))
    return out


def _group_attrs(location: str) -> tuple[dict, int] | None:
    """The attributes and zarr format of a group at ``location``, None where there is none."""
    import zarr
    from zarr.errors import ContainsArrayError, NodeNotFoundError

    if "://" not in location and not any(
            os.path.isfile(os.path.join(location, f)) for f in ("zarr.json", ".zgroup", ".zattrs")):
        return None
    try:
        group = zarr.open_group(store=_store(location, read_only=True), mode="r")
    except (NodeNotFoundError, FileNotFoundError, ContainsArrayError):
        return None
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read the group metadata at {location}: "
                           f"{one_line(exc, first_only=True, typed=True)}") from exc
    return dict(group.attrs), group.metadata.zarr_format


class ZarrVolume(Volume):
    """A zarr array (an OME-Zarr level, or a plain array) viewed as a chunkflow :class:`Volume`."""

    def __init__(self, url: str, array, level: ome.LevelGeometry | None = None, mip: int = 0) -> None:
        self._array = array  # zarr.Array
        self.mip = mip
        shape = tuple(array.shape)
        attrs = dict(array.attrs)
        level_given = level is not None  # OME-Zarr metadata places every level in physical units
        if level is None:
            if len(shape) not in (3, 4):
                raise StorageError(f"zarr array at {url} has shape {shape}; expected Z,Y,X or C,Z,Y,X")
            level = ome.LevelGeometry(Vec(attrs.get("voxel_offset", (0, 0, 0))),
                                      tuple(attrs.get("resolution", _DEFAULT_RESOLUTION)),  # type: ignore[arg-type]
                                      ome.Layout(("c", "z", "y", "x") if len(shape) == 4 else ("z", "y", "x"),
                                                 channel=0 if len(shape) == 4 else None))
        else:
            level = self._agree(url, level, attrs)
        self._lead = level.layout.lead
        self._has_channel = level.layout.channel is not None
        channels = shape[level.layout.channel] if self._has_channel else 1
        shards = getattr(array, "shards", None)
        self.sharded = shards is not None
        self.shard_size = Vec(shards[-3:]) if shards is not None else None
        super().__init__(
            url=url,
            bbox=Bbox.from_shape(level.offset, shape[-3:]),
            chunk_size=Vec(array.chunks[-3:]),
            num_channels=channels,
            dtype=array.dtype,
            resolution=level.resolution,
        )
        self.resolution_known = level_given or "resolution" in attrs

    @staticmethod
    def _agree(url: str, level: ome.LevelGeometry, attrs: dict) -> ome.LevelGeometry:
        """OME metadata and chunkflow's own attributes (where both exist) must place the level alike."""
        if "voxel_offset" not in attrs or "resolution" not in attrs:
            return level
        offset, resolution = Vec(attrs["voxel_offset"]), tuple(float(r) for r in attrs["resolution"])
        if offset != level.offset or not all(math.isclose(a, b, rel_tol=1e-9)
                                             for a, b in zip(resolution, level.resolution)):
            raise StorageError(
                f"{url}: its OME-Zarr metadata places it at voxel offset {tuple(level.offset)}, "
                f"{ome.fmt_resolution(level.resolution)} nm, but its chunkflow attributes say {tuple(offset)}, "
                f"{ome.fmt_resolution(resolution)} nm; make them agree")
        return ome.LevelGeometry(offset, resolution, level.layout)  # type: ignore[arg-type]

    @classmethod
    def open_if_exists(cls, url: str, location: str, mip: int = 0) -> "ZarrVolume | None":
        import zarr
        from zarr.errors import NodeNotFoundError

        ome.check_mip(mip)
        if "://" not in location and not os.path.exists(location):
            return None  # zarr's LocalStore would create the directory while looking
        try:
            node = zarr.open(store=_store(location), mode="r+", zarr_format=None)
        except (NodeNotFoundError, FileNotFoundError):
            return None
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot open volume {url}: {one_line(exc, first_only=True, typed=True)}") from exc
        if isinstance(node, zarr.Group):
            return cls._open_image(url, node, mip)
        for parent, below in _parents(location):
            found = _group_attrs(parent)
            if found is None:
                continue
            ms = ome.parse_multiscale(found[0], parent, found[1])
            index = ms.index_of(below) if ms is not None else None
            if index is None:
                continue
            if mip != 0:
                raise StorageError(f"--mip {mip}: {url} is level {index} of the OME-Zarr image {parent}; "
                                   f"open {parent} with --mip {mip} to choose a level")
            return cls(url, node, ms.geometry(index, node.shape))  # mip 0 of what was opened
        if mip != 0:
            raise StorageError(f"--mip {mip}: {url} is a plain zarr array, which has one level (0); "
                               "several levels need an OME-Zarr image")
        return cls(url, node)

    @classmethod
    def _open_image(cls, url: str, group, mip: int) -> "ZarrVolume":
        import zarr

        attrs = dict(group.attrs)
        ms = ome.parse_multiscale(attrs, url, group.metadata.zarr_format)
        if ms is None:
            member = group.get("0")
            if isinstance(member, zarr.Array) and "voxel_offset" in member.attrs and mip == 0:
                return cls(url, member)  # chunkflow output whose group metadata is being written
            if "bioformats2raw.layout" in attrs:
                raise StorageError(f"{url} is a bioformats2raw container of OME-Zarr images; "
                                   f"give one image, e.g. {url.rstrip('/')}/0")
            raise StorageError(f"zarr group at {url} is not an OME-Zarr image (no multiscales metadata); "
                               "give an image group or an array")
        level = ms.level(mip)
        array = group.get(level.path)
        if not isinstance(array, zarr.Array):
            raise StorageError(f"{url}: OME-Zarr level {mip} names dataset {level.path!r}, which is not an array there")
        return cls(url, array, ms.geometry(mip, array.shape), mip=mip)

    @classmethod
    def open(cls, url: str, location: str, mip: int = 0) -> "ZarrVolume":
        vol = cls.open_if_exists(url, location, mip)
        if vol is None:
            raise StorageError(f"no volume at {url} (no zarr array or OME-Zarr image there)")
        return vol

    @classmethod
    def create(
        cls,
        url: str,
        location: str,
        bbox: Bbox,
        chunk_size: Vec,
        num_channels: int,
        dtype: np.dtype,
        resolution: Sequence[float],
        layer_type: str = "image",
        compression: str = "default",
        shard: Vec | None = None,
    ) -> "ZarrVolume":
        """A new one-level OME-Zarr 0.5 image (array ``"0"``), or the one a concurrent creator made;
        with ``shard`` (ZYX, a multiple of ``chunk_size``) its chunks are stored in zarr v3 shards."""
        import zarr
        from zarr.errors import ContainsArrayError, ContainsGroupError

        compressors = zarr_compressors(compression)  # refused before anything is written
        resolution = [float(r) for r in resolution]
        store = _store(location)
        try:
            array = zarr.create_array(
                store=store,
                name="0",
                shape=(num_channels, *bbox.shape),
                chunks=(num_channels, *chunk_size),
                shards=(num_channels, *shard) if shard is not None else None,
                dtype=dtype,
                fill_value=0,
                zarr_format=3,
                compressors=compressors,
                dimension_names=["c", "z", "y", "x"],
                attributes={"voxel_offset": list(bbox.start), "resolution": resolution, "layer_type": layer_type},
            )
            name = os.path.basename(location.rstrip("/"))
            name = name[: -len(".zarr")] if name.endswith(".zarr") else name
            group = zarr.open_group(store=store, mode="a", zarr_format=3)
            group.attrs.update(ome.image_attributes(name, resolution, bbox.start))
        except (ContainsArrayError, ContainsGroupError):
            # Lost a creation race: the caller compares geometry of what is there.
            existing = cls.open(url, location)
            log.info("volume %s was created concurrently", url)
            return existing
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create volume {url}: {one_line(exc, first_only=True, typed=True)}") from exc
        log.debug("created OME-Zarr %s (compression %s)", url, compression)
        return cls(url, array, ome.LevelGeometry(bbox.start, tuple(resolution),  # type: ignore[arg-type]
                                                 ome.Layout(("c", "z", "y", "x"), channel=0)))

    def claims(self, fresh: bool = False) -> list:
        attrs = self._fresh_attributes() if fresh else self._array.attrs
        return [c for c in attrs.get(CLAIMS_KEY, []) if isinstance(c, dict)]

    def _fresh_attributes(self) -> Any:
        """The array's attributes as they are now: read straight from its metadata file on a local
        disk (opening the array again costs about a millisecond, paid before every block's writes),
        else by opening it again."""
        import zarr
        from zarr.storage import LocalStore

        store_path = self._array.store_path
        try:
            if isinstance(store_path.store, LocalStore):
                directory = os.path.join(str(store_path.store.root), store_path.path)
                v3 = self._array.metadata.zarr_format == 3
                try:
                    document = read_json_file(os.path.join(directory, "zarr.json" if v3 else ".zattrs"))
                except FileNotFoundError:
                    document = None if v3 else {}  # a v2 array without attributes has no .zattrs
                if isinstance(document, dict):
                    return document.get("attributes", {}) if v3 else document
            return zarr.open_array(store=store_path, mode="r").attrs
        except Exception as exc:  # noqa: BLE001 - a store gone or a file garbled: the block fails, in one line
            raise StorageError(f"cannot read the attributes of {self.url} again (to check its jobs' claims): "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc

    def add_claim(self, claim: dict) -> None:
        """Append ``claim`` to the array's attribute and write its metadata back."""
        try:
            self._array.update_attributes({CLAIMS_KEY: list(self._array.attrs.get(CLAIMS_KEY, [])) + [claim]})
        except Exception as exc:  # noqa: BLE001 - stores raise many kinds; report one line
            raise StorageError(f"cannot record this job in {self.url}'s attributes: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc

    def _selection(self, bbox: Bbox) -> tuple:
        return (*self._lead, *bbox.slices(self.bbox))

    def _read(self, bbox: Bbox) -> np.ndarray:
        try:
            data = np.asarray(self._array[self._selection(bbox)])
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"read of box {bbox.name} from {self.url} failed: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc
        return data if self._has_channel else data[None]

    def _write(self, bbox: Bbox, data: np.ndarray) -> None:
        value = data if self._has_channel else data[0]
        try:
            self._array[self._selection(bbox)] = value
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"write of box {bbox.name} to {self.url} failed: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc
        log.debug("wrote %s to %s", bbox.name, self.url)
