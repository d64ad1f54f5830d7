"""Output compressions of new precomputed layers: which exist, which a layer of a given dtype and
channel count can take on this machine, and how a layer's info records its choice
(docs/formats_precomputed.md). Pure: reads only the info dicts it is given and the installed modules.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from chunkflow.errors import StorageError

#: the info-file key that records the output compression chunkflow created a layer with; every
#: writer reads it (Neuroglancer, tensorstore and CloudVolume ignore keys they do not know)
COMPRESSION_KEY = "chunkflow_output_compression"
#: quality of ``jpeg`` outputs (CloudVolume's default), written into the info as ``jpeg_quality``
JPEG_QUALITY = 85
#: deflate level of ``png`` chunks (``png_level`` in the info): on uint8 membrane maps 1 was as
#: small as CloudVolume's default 9 and 9x faster (docs/formats_precomputed.md). gzip objects stay
#: at level 9: CloudVolume 12.15 compresses image chunks before its compress_level reaches them
PNG_LEVEL = 1


@dataclass(frozen=True)
class _Codec:
    encoding: str                 # the scale's "encoding" in the info file
    gzip: bool | None = False     # objects gzip-compressed (NAME.gz on file://, Content-Encoding on gs://,
                                  # s3://); None: as CloudVolume does by default, on gs:// and s3:// only
    dtypes: tuple[str, ...] = ()  # () for every dtype
    one_channel: bool = False     # CloudVolume 12 reads several png/jpeg channels back into the wrong voxels
    module: str = ""              # "python_module:pip-package" of the codec, "" for none
    lossless: bool = True


CODECS: dict[str, _Codec] = {
    "default": _Codec("raw", gzip=None),
    "none": _Codec("raw"),
    "gzip": _Codec("raw", gzip=True),
    "png": _Codec("png", dtypes=("uint8", "uint16"), one_channel=True, module="pyspng:pyspng-seunglab"),
    "jpeg": _Codec("jpeg", dtypes=("uint8",), one_channel=True, module="simplejpeg:simplejpeg", lossless=False),
    "fpzip": _Codec("fpzip", dtypes=("float32", "float64"), module="fpzip:fpzip"),
}
_SEGMENTATION = ("compressed_segmentation", "compresso", "crackle")
_NOT_OFFERED = {
    "raw": "is spelled none (raw encoding, uncompressed objects)",
    "zfpc": "is not offered (CloudVolume needs zfpc for it, and neither Neuroglancer nor tensorstore reads it)",
    "jxl": "is not offered (CloudVolume needs imagecodecs for it and tensorstore cannot read it)",
    "kempressed": "is lossy (CloudVolume adds 2.0 before fpzip)",
}


def _installed(codec: _Codec) -> bool:
    if not codec.module:
        return True
    try:
        return importlib.util.find_spec(codec.module.split(":")[0]) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def _dtype_name(dtype) -> str:
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return str(dtype)


def precomputed_compressions(dtype: str | np.dtype, num_channels: int | None = None) -> tuple[str, ...]:
    """The output compressions a new precomputed layer of ``dtype`` (and ``num_channels``, if
    given) can be created with on this machine: ``default``, ``none`` and ``gzip`` always, ``png``
    and ``jpeg`` for one-channel uint8, ``fpzip`` for float32, each only where its codec is installed."""
    dt = _dtype_name(dtype)
    return tuple(name for name, c in CODECS.items()
                 if (not c.dtypes or dt in c.dtypes) and not (c.one_channel and num_channels not in (None, 1))
                 and _installed(c))


def check_precomputed_compression(compression: str, dtype: str | np.dtype, num_channels: int | None = None) -> None:
    """Refuse, in one line naming the valid values, an output compression that a new precomputed
    layer of ``dtype`` and ``num_channels`` cannot take (:class:`StorageError`); nothing is written."""
    dt = _dtype_name(dtype)
    valid = precomputed_compressions(dt, num_channels)
    if isinstance(compression, str) and compression in valid:
        return
    channels = f" {num_channels}-channel" if num_channels not in (None, 1) else ""
    where = f"valid for{channels} {dt} precomputed outputs: {', '.join(valid)}"
    codec = CODECS.get(compression) if isinstance(compression, str) else None
    if not isinstance(compression, str):
        reason = "is not a name"
    elif compression in _SEGMENTATION:
        reason = "is for segmentation (label) layers, not images"
    elif compression in _NOT_OFFERED:
        reason = _NOT_OFFERED[compression]
    elif codec is None:
        reason = "is not a precomputed output compression"
    elif codec.dtypes and dt not in codec.dtypes:
        reason = f"takes {'/'.join(codec.dtypes)} outputs only, not {dt}"
    elif codec.one_channel and num_channels not in (None, 1):
        reason = f"takes one channel only (CloudVolume reads several back into the wrong voxels), not {num_channels}"
    else:
        package = codec.module.split(":")[1]
        reason = f"needs the {package} package on every machine that writes or reads it (pip install {package})"
    raise StorageError(f"output compression {compression!r} {reason}; {where}")


def is_lossless(compression: str) -> bool:
    """Whether reads of an output written with ``compression`` give back the very values written
    (every choice but ``jpeg``; an unknown name is not)."""
    codec = CODECS.get(compression)
    return bool(codec and codec.lossless)


def layer_compression(info: dict) -> str:
    """The output compression of a layer: what chunkflow recorded when it created the layer, else
    its encoding's name, ``default`` for raw (how such layers have always been written)."""
    recorded = info.get(COMPRESSION_KEY)
    if isinstance(recorded, str) and recorded in CODECS:
        return recorded
    encoding = info["scales"][0].get("encoding", "raw")
    return "default" if encoding == "raw" else str(encoding)


def write_compress(info: dict, location: str) -> bool | str | None:
    """CloudVolume's ``compress`` for writes into a layer, from the compression its info records.
    ``default``, and a layer created before chunkflow recorded one: uncompressed files on file://,
    CloudVolume's default (``None``: gzip for raw objects) on gs:// and s3://."""
    recorded = info.get(COMPRESSION_KEY)
    codec = CODECS.get(recorded) if isinstance(recorded, str) else None
    if codec is None or codec.gzip is None:
        return False if location.startswith("file://") else None
    return "gzip" if codec.gzip else False
