"""The donation wire format: pure bytes in, bytes out, no I/O.

Layout::

    b"CFDON1\\n"                      magic (7 bytes)
    uint32 little-endian             header length H
    H bytes UTF-8 JSON header        {key, bbox, shape, dtype, checksum, job_hash,
                                      compression, nbytes_raw, nbytes_payload}, padded
                                      with spaces so the payload starts at a multiple of
                                      :data:`PAYLOAD_ALIGN` bytes
    nbytes_payload bytes             payload: the C-order array bytes, maybe compressed

The padding lets stage two add an uncompressed payload straight from the fetched bytes (an
aligned read-only view, no copy); donations written without it decode as before, by a copy.

``checksum`` is the CRC-32 (zlib's polynomial and values) of the *raw, uncompressed* array bytes,
as 8 hex digits, so it certifies what stage two adds, whatever the compression. It is computed by
libdeflate (the ``deflate`` package, which cloud-files brings) where it is installed: the same
values as ``zlib.crc32``, about ten times faster; else by ``zlib``.
``nbytes_payload`` (beyond the fields the design lists) lets a truncated compressed
payload be told apart from a corrupt one.

Every check in :func:`decode_donation` exists so that a corrupt, truncated, mislabelled
or foreign piece is refused with a one-line :class:`DonationError` instead of being
blended in silently (Invariant 3 of the design).
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from chunkflow.bbox import Bbox
from chunkflow.errors import DonationError

MAGIC = b"CFDON1\n"
_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LEN.size
MAX_HEADER = 1 << 20
#: the payload starts at a multiple of this many bytes from the start of the donation
PAYLOAD_ALIGN = 16
DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "zstd", "blosc")
#: the checksum's placeholder while the header's length is worked out (a checksum is 8 hex digits)
_NO_CHECKSUM = "0" * 8


def _fast_crc32() -> Callable:
    """libdeflate's CRC-32 if the ``deflate`` package is installed (same values as zlib's), else zlib's."""
    try:
        from deflate import crc32
    except ImportError:
        return zlib.crc32
    return crc32 if crc32(b"123456789") == zlib.crc32(b"123456789") else zlib.crc32


_crc32 = _fast_crc32()


@dataclass(frozen=True)
class DonationHeader:
    key: str
    bbox: Bbox
    shape: tuple[int, int, int, int]
    dtype: str
    checksum: str
    job_hash: str
    compression: str
    nbytes_raw: int
    nbytes_payload: int

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "bbox": self.bbox.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "checksum": self.checksum,
            "job_hash": self.job_hash,
            "compression": self.compression,
            "nbytes_raw": self.nbytes_raw,
            "nbytes_payload": self.nbytes_payload,
        }


def _codec(compression: str):
    if compression == "zstd":
        from numcodecs import Zstd

        return Zstd(level=1)
    if compression == "blosc":
        from numcodecs import Blosc

        return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def checksum(raw) -> str:
    """CRC-32 of a contiguous bytes-like object, 8 lowercase hex digits (the values of ``zlib.crc32``)."""
    return f"{_crc32(raw) & 0xFFFFFFFF:08x}"


def encode_donation(
    array: np.ndarray, bbox: Bbox, key: str, job_hash: str, compression: str = "none"
) -> bytes | bytearray:
    """Serialise a C,Z,Y,X float32/float16 ``array`` covering ``bbox`` under ``key``.

    ``array`` may be a strided view (a piece of a block's chunk): uncompressed, it is copied once,
    straight into the returned buffer (a ``bytearray``), and the checksum is taken there."""
    _check_encodable(array, bbox, key, job_hash, compression)
    dtype = array.dtype.newbyteorder("<")
    if compression == "none":
        return _encode_raw(array, bbox, key, job_hash, dtype)
    array = np.ascontiguousarray(array, dtype=dtype)
    raw = memoryview(array).cast("B")
    payload = memoryview(_codec(compression).encode(array)).cast("B")
    head = _header_bytes(_header(array, bbox, key, job_hash, compression, checksum(raw), len(payload)))
    return b"".join((MAGIC, _LEN.pack(len(head)), head, payload))


def _check_encodable(array: np.ndarray, bbox: Bbox, key: str, job_hash: str, compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if not isinstance(array, np.ndarray) or array.ndim != 4:
        raise ValueError(f"donation {key}: array must be a 4D C,Z,Y,X numpy array")
    if array.dtype.name not in DTYPES:
        raise ValueError(f"donation {key}: dtype {array.dtype} is not one of {DTYPES}")
    if tuple(array.shape[1:]) != tuple(bbox.shape):
        raise ValueError(f"donation {key}: array shape {array.shape} does not match bbox {bbox.name}")
    if not key or not job_hash:
        raise ValueError("donation key and job_hash must be non-empty")
    if array.dtype == np.float16 and not np.isfinite(array).all():
        raise ValueError(f"donation {key}: values do not fit float16 (|value| > 65504, or NaN); "
                         "use donation dtype float32")


def _header(array: np.ndarray, bbox: Bbox, key: str, job_hash: str, compression: str, crc: str,
            nbytes_payload: int) -> DonationHeader:
    return DonationHeader(
        key=key,
        bbox=bbox,
        shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
        dtype=array.dtype.name,
        checksum=crc,
        job_hash=job_hash,
        compression=compression,
        nbytes_raw=array.size * array.dtype.itemsize,
        nbytes_payload=nbytes_payload,
    )


def _header_bytes(header: DonationHeader) -> bytes:
    """The JSON header, padded with spaces so that the payload starts at a multiple of
    :data:`PAYLOAD_ALIGN` (JSON allows trailing whitespace)."""
    head = json.dumps(header.to_json(), separators=(",", ":")).encode("utf-8")
    return head + b" " * (-(_PREFIX + len(head)) % PAYLOAD_ALIGN)


def _encode_raw(array: np.ndarray, bbox: Bbox, key: str, job_hash: str, dtype: np.dtype) -> bytearray:
    """An uncompressed donation: ``array`` copied once into place behind its header, the checksum
    taken over that copy. The checksum's 8 hex digits do not change the header's length."""
    nbytes = array.size * dtype.itemsize
    probe = _header_bytes(_header(array, bbox, key, job_hash, "none", _NO_CHECKSUM, nbytes))
    offset = _PREFIX + len(probe)
    out = bytearray(offset + nbytes)
    payload = memoryview(out)[offset:]
    np.copyto(np.frombuffer(payload, dtype=dtype).reshape(array.shape), array)  # gathers a strided piece
    head = _header_bytes(_header(array, bbox, key, job_hash, "none", checksum(payload), nbytes))
    if len(head) != len(probe):
        raise AssertionError(f"donation {key}: header length changed with its checksum")
    out[:offset] = MAGIC + _LEN.pack(len(head)) + head
    return out


def _parse_header(data: bytes, key: str) -> tuple[DonationHeader, int]:
    """Header and the payload offset; ``key`` only labels errors."""
    view = memoryview(data)
    if len(view) < len(MAGIC):
        if bytes(view) == MAGIC[: len(view)]:
            raise DonationError(key, "is truncated")
        raise DonationError(key, "is corrupt: bad magic (not a chunkflow donation)")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise DonationError(key, "is corrupt: bad magic (not a chunkflow donation)")
    if len(view) < _PREFIX:
        raise DonationError(key, "is truncated")
    (hlen,) = _LEN.unpack(view[len(MAGIC):_PREFIX])
    if hlen > MAX_HEADER:
        raise DonationError(key, f"is corrupt: header length {hlen} is implausible")
    if len(view) < _PREFIX + hlen:
        raise DonationError(key, "is truncated")
    try:
        h = json.loads(bytes(view[_PREFIX:_PREFIX + hlen]).decode("utf-8"))
        header = DonationHeader(
            key=str(h["key"]),
            bbox=Bbox.from_name(h["bbox"]),
            shape=tuple(int(s) for s in h["shape"]),  # type: ignore[arg-type]
            dtype=str(h["dtype"]),
            checksum=str(h["checksum"]),
            job_hash=str(h["job_hash"]),
            compression=str(h["compression"]),
            nbytes_raw=int(h["nbytes_raw"]),
            nbytes_payload=int(h["nbytes_payload"]),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DonationError(key, f"is corrupt: unreadable header ({type(exc).__name__})") from None
    return header, _PREFIX + hlen


def read_header(data: bytes, key: str = "<unknown>") -> DonationHeader:
    """The header alone (for ``inspect``): no decompression, no checksum.

    ``data`` may be just the first bytes of a donation (a ranged read); it must hold
    at least :func:`header_end` bytes. ``key`` only labels errors.
    """
    return _parse_header(data, key)[0]


def header_end(data: bytes) -> int | None:
    """Where the header of a donation starting with ``data`` ends (None: too short to tell).

    Lets a reader that fetched the first few KiB know whether it holds the whole header.
    """
    if len(data) < _PREFIX or bytes(memoryview(data)[: len(MAGIC)]) != MAGIC:
        return None
    (hlen,) = _LEN.unpack(memoryview(data)[len(MAGIC):_PREFIX])
    return _PREFIX + hlen


def decode_donation(data: bytes, key: str, job_hash: str, channels: int | None = None,
                    dtype: str | None = None, copy: bool = True) -> tuple[DonationHeader, np.ndarray]:
    """Verify and decode a donation expected under ``key`` for job ``job_hash``.

    Returns the header and a writable C,Z,Y,X array; with ``copy=False``, an uncompressed payload
    that starts aligned in ``data`` comes back as a read-only view of ``data`` instead (no copy:
    what stage two adds). Raises :class:`DonationError`
    if anything is off: magic, truncation, header, key, job, its box vs the piece the key
    names, shape vs box, channels and dtype (when given: the job's), sizes, decompression
    or checksum. A consistent header with the wrong box must never reach the sum, where
    numpy would broadcast it over the piece.
    """
    from chunkflow.geometry import parse_key

    header, offset = _parse_header(data, key)
    if header.key != key:
        raise DonationError(key, f"is mislabelled: its header names key {header.key}")
    if header.job_hash != job_hash:
        raise DonationError(key, f"belongs to job {header.job_hash}, not {job_hash}")
    try:
        _, piece = parse_key(key)
    except ValueError as exc:
        raise DonationError(key, f"is not a donation key: {exc}") from None
    if header.bbox != piece:
        raise DonationError(key, f"is corrupt: header box {header.bbox.name}, expected {piece.name}")
    if len(header.shape) != 4 or tuple(header.shape[1:]) != tuple(header.bbox.shape):
        raise DonationError(key, f"is corrupt: shape {list(header.shape)} does not match bbox {header.bbox.name}")
    if channels is not None and header.shape[0] != channels:
        raise DonationError(key, f"is corrupt: {header.shape[0]} channels, the job's model has {channels}")
    if header.dtype not in DTYPES:
        raise DonationError(key, f"is corrupt: unsupported dtype {header.dtype!r}")
    if dtype is not None and header.dtype != np.dtype(dtype).name:
        raise DonationError(key, f"is corrupt: dtype {header.dtype}, the job donates {np.dtype(dtype).name}")
    if header.compression not in COMPRESSIONS:
        raise DonationError(key, f"is corrupt: unknown compression {header.compression!r}")
    dtype = np.dtype(header.dtype).newbyteorder("<")
    expected_raw = int(np.prod(header.shape)) * dtype.itemsize
    if header.nbytes_raw != expected_raw:
        raise DonationError(key, f"is corrupt: nbytes_raw {header.nbytes_raw} != {expected_raw} for its shape")
    available = len(data) - offset
    if available < header.nbytes_payload:
        raise DonationError(key, "is truncated")
    if available > header.nbytes_payload:
        raise DonationError(key, f"is corrupt: {available - header.nbytes_payload} trailing bytes")
    payload = memoryview(data)[offset:]
    if header.compression == "none":
        if header.nbytes_payload != expected_raw:
            raise DonationError(key, "is corrupt: payload size does not match its shape")
        view = np.frombuffer(payload, dtype=dtype).reshape(header.shape)
        if not copy and view.flags.aligned:
            if checksum(payload) != header.checksum:
                raise DonationError(key, "is corrupt: checksum mismatch")
            view.flags.writeable = False
            return header, view
        out = np.empty(header.shape, dtype=dtype)
        np.copyto(out, view)
    else:
        out = np.empty(header.shape, dtype=dtype)
        try:
            _codec(header.compression).decode(payload, out=out)
        except Exception as exc:  # noqa: BLE001 - codecs raise assorted errors on garbage
            raise DonationError(key, f"is corrupt: {header.compression} payload does not decompress "
                                     f"({type(exc).__name__})") from None
    if checksum(memoryview(out).cast("B")) != header.checksum:
        raise DonationError(key, "is corrupt: checksum mismatch")
    return header, out
