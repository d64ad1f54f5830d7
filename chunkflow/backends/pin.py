"""Pin a job's model to the checksum in its manifest: read the files once, verify, load those bytes.

Why: ``chunkflow plan`` records ``model_checksum`` (:func:`~chunkflow.backends.base.model_checksum`)
in the manifest, and the job hash covers it, but a worker loads the model by its path, maybe days
later. A model or weights file replaced in between would make the worker run another network and
still finish with exit 0: the worst failure chunkflow can have. So every worker loads a job's model
through :func:`read_verified` (``load_backend(..., checksum=job.model_checksum)``): each file is read
into memory once, the checksum is computed over those bytes and compared with the planned one, and
the built-in backends then load from the very same bytes (:func:`model_bytes`), so the file cannot
change between the check and the load.

A backend plugin that names a file is verified the same way before its factory runs, but the
plugin opens the file itself: a change in that short window is not seen (see docs/security.md).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path

from chunkflow.backends.base import check_file, checksum_of, model_files
from chunkflow.errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["ModelChanged", "model_bytes", "pinned", "read_verified", "verify_model"]

_PINNED: contextvars.ContextVar[dict[Path, bytes] | None] = contextvars.ContextVar("chunkflow_pinned_model",
                                                                                   default=None)


class ModelChanged(ModelError):
    """A model or weights file no longer holds the bytes the job was planned with."""


def _key(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _short(digest: str) -> str:
    return digest[:12]


def read_verified(model: str, weights: str | None, checksum: str) -> dict[Path, bytes]:
    """Read every file of ``model``/``weights`` once and check them against the planned ``checksum``.

    Returns ``{resolved path: bytes}``, the bytes that were hashed, for :func:`pinned`. Raises
    :class:`ModelChanged` (one line naming the files and both checksums) on a mismatch, ModelError
    for a file that is gone.
    """
    files: dict[Path, bytes] = {}

    def read(path: Path) -> bytes:
        data = check_file(path).read_bytes()
        files[_key(path)] = data
        return data

    found = checksum_of(model, weights, read)
    if found != checksum:
        named = " and ".join(repr(str(p)) for p in model_files(model, weights)) or repr(model)
        raise ModelChanged(f"model {model!r}: {named} changed since the job was planned (planned sha256 "
                           f"{_short(checksum)}, found {_short(found)}); re-plan the job, or put the planned file back")
    log.debug("model %s matches the job's checksum %s", model, _short(checksum))
    return files


def verify_model(model: str, weights: str | None, checksum: str) -> None:
    """Check the model's files against ``checksum`` without loading anything (a worker that keeps a
    model loaded calls this when a new job asks for the same model)."""
    read_verified(model, weights, checksum)


@contextlib.contextmanager
def pinned(files: dict[Path, bytes]) -> Iterator[None]:
    """While active (in this thread), :func:`model_bytes` serves ``files`` instead of the disk."""
    token = _PINNED.set(files)
    try:
        yield
    finally:
        _PINNED.reset(token)


def model_bytes(path: str | Path, what: str = "model file") -> bytes:
    """The bytes of a model or weights file: the verified ones when the load is pinned, else the file's."""
    files = _PINNED.get()
    if files is not None:
        data = files.get(_key(path))
        if data is not None:
            return data
        raise ModelError(f"{what} {str(path)!r} is not one of the files the job's checksum covers; re-plan the job")
    return check_file(path, what).read_bytes()
