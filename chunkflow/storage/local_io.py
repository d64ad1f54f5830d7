"""Whole-file reads on a local disk without a Python file object (``open()`` builds a buffered
reader per call: about 4 of the 10 microseconds of reading a 64 KiB chunk, paid per chunk and per
donation)."""
from __future__ import annotations

import json
import os
import time

__all__ = ["read_file", "read_json_file", "read_to_end"]

#: reads of a JSON file that does not parse before its error is raised, and the pause between them
JSON_ATTEMPTS, JSON_PAUSE_S = 5, 0.02


def read_to_end(fd: int) -> bytes:
    """Everything from ``fd`` to its end: one read of the size ``fstat`` gives, then reads until one
    returns nothing (a file that grew or a short read is still read whole)."""
    data = os.read(fd, os.fstat(fd).st_size + 1)
    more = os.read(fd, 1 << 20) if data else b""
    if not more:
        return data
    parts = [data, more]
    while parts[-1]:
        parts.append(os.read(fd, 1 << 20))
    return b"".join(parts)


def read_file(path: str | os.PathLike) -> bytes:
    """The whole content of the file at ``path`` (``FileNotFoundError`` and other ``OSError``\\ s as
    ``open()`` raises them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_to_end(fd)
    finally:
        os.close(fd)


def read_json_file(path: str | os.PathLike):
    """The JSON document in the file at ``path``, read again (up to :data:`JSON_ATTEMPTS` times) while
    it does not parse: CloudVolume's ``commit_info`` and zarr rewrite metadata files in place, so a
    read can meet one half-written. The last parse error (``ValueError``) is raised."""
    for attempt in range(JSON_ATTEMPTS):
        data = read_file(path)
        try:
            return json.loads(data)
        except ValueError:
            if attempt == JSON_ATTEMPTS - 1:
                raise
            time.sleep(JSON_PAUSE_S)
