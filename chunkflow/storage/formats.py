"""Volume formats chunkflow does not read, recognised where a URL is first seen, so that the
refusal names the format and the command that converts it to zarr (docs/formats_zarr.md).

HDF5 (``.h5``, ``.hdf5``, ``.hdf``, ``.he5``), N5 (``.n5``, or a folder whose
``attributes.json`` holds an N5 version or dataset attributes) and TIFF (``.tif``/``.tiff``
files, or a folder of them) are told apart by name, and for local folders by a look inside
(only where the URL names no format chunkflow reads).
"""
from __future__ import annotations

import json
import os

#: the conversions, with ``{src}`` (an N5 dataset's folder; a TIFF file, or a glob of them), ``{dst}`` and
#: for HDF5 ``{dataset}`` to fill in; docs/formats_zarr.md shows them with example names, and tests run
#: the TIFF and N5 ones
CONVERT = {
    "HDF5": ("python3 -c \"import h5py, dask.array as da; "
             "da.from_array(h5py.File('{src}', 'r')['{dataset}'], chunks=(64, 256, 256)).to_zarr('{dst}')\""),
    "N5": ("python3 -c \"import tensorstore as ts; "
           "s = ts.open({{'driver': 'n5', 'kvstore': {{'driver': 'file', 'path': '{src}'}}}}).result()"
           "[ts.d[::-1].transpose[:]]; "
           "ts.open({{'driver': 'zarr3', 'kvstore': {{'driver': 'file', 'path': '{dst}'}}}}, create=True, "
           "dtype=s.dtype, shape=s.shape, chunk_layout=ts.ChunkLayout(chunk_shape=[64, 256, 256]))"
           ".result().write(s).result()\""),
    "TIFF": ("python3 -c \"import tifffile, dask.array as da; "
             "da.from_zarr(tifffile.imread('{src}', aszarr=True)).rechunk((64, 256, 256)).to_zarr('{dst}')\""),
}
#: then the voxel size (ZYX nm) and offset, which none of the three conversions carries over
SET_RESOLUTION = ("python3 -c \"import zarr; zarr.open_array('{dst}').attrs.update("
                  "resolution=[40, 8, 8], voxel_offset=[0, 0, 0])\"")

_SUFFIXES = {".h5": "HDF5", ".hdf5": "HDF5", ".hdf": "HDF5", ".he5": "HDF5", ".n5": "N5",
             ".tif": "TIFF", ".tiff": "TIFF"}
_OURS = ("info", "zarr.json", ".zarray", ".zgroup", ".zattrs")


def _strip(url: str) -> str:
    for prefix in ("zarr://", "precomputed://", "file://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
    return url


def _by_name(path: str) -> tuple[str, str, str] | None:
    """``(format, the path up to the component that names it, the rest)`` from the names alone."""
    parts = path.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if ".zarr" in part.lower():
            return None  # a zarr store (inside an HDF5-named folder is not our business)
        fmt = _SUFFIXES.get(os.path.splitext(part)[1].lower())
        if fmt:
            return fmt, "/".join(parts[: i + 1]), "/".join(parts[i + 1:])
    return None


def _by_content(path: str) -> tuple[str, str] | None:
    """``(format, dataset)`` for a local folder with no precomputed or zarr metadata: an N5 container
    (dataset unknown), an N5 dataset (``"."``) or a folder of TIFF files."""
    if "://" in path or not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in _OURS):
        return None
    attributes = os.path.join(path, "attributes.json")
    if os.path.isfile(attributes):
        try:
            with open(attributes) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and {"dimensions", "blockSize", "dataType"} <= set(meta):
            return "N5", "."
        if isinstance(meta, dict) and "n5" in meta:
            return "N5", ""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() in (".tif", ".tiff"):
                    return "TIFF", ""
    except OSError:
        return None
    return None


def _destination(src: str, fmt: str) -> str:
    base = src.rstrip("/")
    stem, ext = os.path.splitext(base)
    return (stem if ext and _SUFFIXES.get(ext.lower()) == fmt else base) + ".zarr"


def foreign_format(url: str) -> str | None:
    """One refusal line if ``url`` names an HDF5, N5 or TIFF volume; None otherwise."""
    path = _strip(url)
    found = _by_name(path)
    if found is None:
        content = _by_content(path)
        if content is None:
            return None
        found = (content[0], path.rstrip("/"), content[1])
    fmt, src, inside = found
    if "://" in src:
        return (f"{fmt} input {src} is not read by chunkflow; convert it to zarr first "
                "(docs/formats_zarr.md has the commands, for local copies)")
    dst = _destination(src, fmt)
    dataset = inside or "DATASET"
    source = src
    if fmt == "N5":
        source = src if dataset == "." else f"{src}/{dataset}"
    elif fmt == "TIFF" and "://" not in src and os.path.isdir(src):
        source = f"{src}/*.tif*"
    command = CONVERT[fmt].format(src=source, dst=dst, dataset=dataset)
    where = " (DATASET: the volume's path inside it)" if dataset == "DATASET" and fmt != "TIFF" else ""
    return (f"{fmt} input {src} is not read by chunkflow; convert it to zarr first: {command}{where}, then set "
            f"its voxel size: {SET_RESOLUTION.format(dst=dst)} (ZYX nm; see docs/formats_zarr.md)")
