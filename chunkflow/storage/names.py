"""Object names: what a store accepts as a name or a listing prefix.

Names are validated before they reach any store (a directory or a bucket), so a key can never
escape the store root. A refusal is an :class:`InvalidName`: a storage error and a ValueError,
one line naming the value.
"""
from __future__ import annotations

from chunkflow.errors import StorageError

__all__ = ["InvalidName", "validate_name", "validate_prefix"]


class InvalidName(StorageError, ValueError):
    """An object name or store prefix that could escape the store root (a refusal, one line)."""


def validate_name(name: str, what: str = "object name") -> str:
    """Return ``name`` if it is a safe relative ``a/b/c`` name, else raise :class:`InvalidName`
    (a :class:`ValueError` too)."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} {name!r} must be a non-empty string")
    if "\\" in name or "\x00" in name:
        raise InvalidName(f"{what} {name!r} contains a backslash or NUL")
    if name.startswith("/"):
        raise InvalidName(f"{what} {name!r} is absolute; names are relative like a/b/c")
    for segment in name.split("/"):
        if segment == "":
            raise InvalidName(f"{what} {name!r} has an empty path segment")
        if segment in (".", ".."):
            raise InvalidName(f"{what} {name!r} contains {segment!r}")
    return name


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a name that may end with ``/``."""
    if prefix == "":
        return prefix
    validate_name(prefix[:-1] if prefix.endswith("/") else prefix, "prefix")
    return prefix

