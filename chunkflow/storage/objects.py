"""Object stores for donations, manifests and done markers: the interface, and a local directory.

Every write is atomic (a reader sees the old object, the new one, or nothing; never a
torn one), which Invariant 2 of the design relies on: a task killed mid-write leaves
no half donation behind. Names are validated before they reach storage so a key can
never escape the store root.
"""
from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path
from typing import Iterator

from chunkflow.errors import StorageError
from chunkflow.storage.local_io import read_file
from chunkflow.storage.names import validate_name, validate_prefix

log = logging.getLogger(__name__)

_TMP_PREFIX = ".cftmp-"


class ObjectStore:
    """A flat namespace of ``a/b/c`` names mapping to bytes."""

    url: str
    #: the local directory holding the objects, whose filesystem must be flushed to make them
    #: durable (:mod:`chunkflow.storage.durability`); None where a write is durable when it returns
    local_root: str | None = None

    def put(self, name: str, data: bytes, if_absent: bool = False, durable: bool = False) -> bool:
        """Store ``data`` atomically. With ``if_absent``, keep an existing object and return False.
        With ``durable``, the object survives a power loss once this returns (a done marker that an
        engine acknowledges, or cleanup deletes donations, after); other writes are made durable
        together (:mod:`chunkflow.storage.durability`)."""
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        """Return the object's bytes; ``KeyError(name)`` if absent."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "", start_offset: str | None = None) -> Iterator[str]:
        """Names (relative to the store root) starting with ``prefix``; bodies are not fetched.

        ``start_offset``: only names at or after it in byte order (GCS ``startOffset``), so that a
        listing of time-bucketed names skips the old buckets without reading them."""
        for name, _ in self.list_with_sizes(prefix, start_offset):
            yield name

    def list_with_sizes(self, prefix: str = "", start_offset: str | None = None) -> Iterator[tuple[str, int]]:
        raise NotImplementedError

    def names_under(self, prefix: str, start_offset: str | None = None) -> Iterator[str]:
        """The names starting with ``prefix``, without it, in no particular order: the quickest
        listing, for reading a million markers at once (``start_offset`` as in :meth:`list`)."""
        cut = len(prefix)
        for name in self.list(prefix, start_offset):
            yield name[cut:]

    def scan(self, prefix: str = "") -> Iterator[str]:
        """The names starting with ``prefix``, in no particular order, streamed: for a reader that
        counts every name once and keeps none (``chunkflow inspect``), so that its memory does not
        follow the number of objects. A paged listing (GCS) already streams: this is :meth:`list`."""
        return self.list(prefix)

    def scan_with_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """:meth:`scan` with each object's size."""
        return self.list_with_sizes(prefix)

    def delete(self, name: str) -> None:
        """Remove an object; an absent one is fine."""
        raise NotImplementedError

    def get_head(self, name: str, nbytes: int) -> bytes:
        """The first ``nbytes`` of an object (all of it if shorter); ``KeyError(name)`` if absent.

        Lets ``inspect`` read a donation's header without its payload. Back ends
        override it with a ranged read; this fallback fetches the whole object.
        """
        return self.get(name)[:nbytes]

    def get_many(self, names: list[str], workers: int = 16) -> dict[str, bytes | None]:
        """Fetch many objects concurrently (bounded thread pool); ``None`` for missing ones."""
        names = list(names)
        for name in names:
            validate_name(name)

        def fetch(name: str) -> bytes | None:
            try:
                return self.get(name)
            except KeyError:
                return None

        if len(names) <= 1 or workers <= 1:
            return {name: fetch(name) for name in names}
        with ThreadPoolExecutor(max_workers=min(workers, len(names)), thread_name_prefix="cf-get") as pool:
            return dict(zip(names, pool.map(fetch, names)))

    def delete_many(self, names: list[str], workers: int = 16) -> int:
        """Remove many objects concurrently (bounded thread pool; an absent one is fine); returns how
        many were asked for. The first error is raised once every delete has ended."""
        names = list(names)
        if len(names) <= 1 or workers <= 1:
            for name in names:
                self.delete(name)
            return len(names)
        with ThreadPoolExecutor(max_workers=min(workers, len(names)), thread_name_prefix="cf-delete") as pool:
            for future in [pool.submit(self.delete, name) for name in names]:
                future.result()
        return len(names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _fsync_directory(directory: str | os.PathLike) -> None:
    """Make a file's name in ``directory`` survive a power loss (after a rename or a link)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryStore(ObjectStore):
    """Objects as files under a local directory.

    ``put`` writes a temp file in the target's directory, then publishes it with ``os.replace``
    (atomic overwrite) or ``os.link`` (atomic create-if-absent: link fails with EEXIST if the name
    exists). Temp files start with ``.cftmp-`` and are never listed. A killed writer leaves the old
    object or the new one, never a torn one. Only a ``durable`` put is fsynced (the file, then its
    directory): a block's other objects are flushed together before its done marker
    (:mod:`chunkflow.storage.durability`, through :attr:`local_root`).

    The root directory is created by the first ``put``, not when the store is opened,
    so reading commands (``show``, ``inspect``) on a mistyped path leave nothing behind.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        self.local_root = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def put(self, name: str, data: bytes, if_absent: bool = False, durable: bool = False) -> bool:
        path = os.path.join(self.local_root, validate_name(name))  # strings, not Paths: a put is ~10 us of Python
        directory, base = os.path.split(path)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # its directory is not there yet (or no more)
                os.makedirs(directory, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            if durable:
                _fsync_directory(directory)
            return True
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"cannot write {name} to {self.url}: {exc.strerror or exc}") from exc

    def get(self, name: str) -> bytes:
        try:
            return read_file(os.path.join(self.local_root, validate_name(name)))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyError(name) from None
        except OSError as exc:
            raise StorageError(f"cannot read {name} from {self.url}: {exc.strerror or exc}") from exc

    def get_head(self, name: str, nbytes: int) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return f.read(max(0, int(nbytes)))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyError(name) from None
        except OSError as exc:
            raise StorageError(f"cannot read {name} from {self.url}: {exc.strerror or exc}") from exc

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "", start_offset: str | None = None) -> Iterator[str]:
        for rel_dir, _, names, whole in self._walk(prefix, start_offset):  # no stat per file
            if whole:
                yield from names
            else:
                yield from (n for n in names if n.startswith(prefix) and (start_offset is None or n >= start_offset))

    def list_with_sizes(self, prefix: str = "", start_offset: str | None = None) -> Iterator[tuple[str, int]]:
        for _, dirpath, names, whole in self._walk(prefix, start_offset):
            for name in names:
                if not whole and not (name.startswith(prefix) and (start_offset is None or name >= start_offset)):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name.rpartition("/")[2])).st_size
                except FileNotFoundError:
                    continue  # deleted while listing
                yield name, size

    def names_under(self, prefix: str, start_offset: str | None = None) -> Iterator[str]:
        if start_offset is not None or not prefix.endswith("/"):
            return super().names_under(prefix, start_offset)
        return map(itemgetter(0), self._files(prefix, len(prefix)))

    def scan(self, prefix: str = "") -> Iterator[str]:
        return map(itemgetter(0), self._files(prefix))

    def scan_with_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        for name, entry in self._files(prefix):
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue  # deleted while listing
            except OSError as exc:
                raise StorageError(f"cannot list {name} in {self.url}: {exc.strerror or exc}") from exc
            yield name, size

    def _files(self, prefix: str, cut: int = 0) -> Iterator[tuple[str, os.DirEntry]]:
        """Every file whose name starts with ``prefix``, as (its name from character ``cut`` on, its
        ``os.scandir`` entry), temp files left out, in no particular order.

        Streamed: one directory entry at a time (``os.walk`` and :meth:`list` hold a directory's
        names, sorted: a million donations in one directory would be a million strings at once).
        Like ``os.walk``, symbolic links to directories are not followed and a directory that
        cannot be read is skipped."""
        validate_prefix(prefix)
        base = prefix.rpartition("/")[0]
        todo = [base + "/" if base else ""]
        while todo:
            rel = todo.pop()
            head, whole = rel[cut:], rel.startswith(prefix)  # whole: every file here matches
            try:
                entries = os.scandir(os.path.join(self.root, rel))
            except OSError:
                continue
            with entries:
                for entry in entries:
                    name = entry.name
                    try:
                        folder = entry.is_dir()  # a directory or a link to one; else a file (a broken link too)
                    except OSError:
                        folder = False
                    if folder:
                        if _may_hold(f"{rel}{name}/", prefix, None) and not _is_link(entry):
                            todo.append(f"{rel}{name}/")
                    elif (whole or (rel + name).startswith(prefix)) and not name.startswith(_TMP_PREFIX):
                        yield head + name, entry

    def _walk(self, prefix: str, start: str | None) -> Iterator[tuple[str, str, list[str], bool]]:
        """Per directory, in order: its path relative to the root, its path, the sorted names of its
        files (relative to the root, temp files left out), and whether all of them match ``prefix``
        and ``start`` (else the caller checks each)."""
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix pins down, and below it only the directories
        # that can hold a name matching the prefix and at or after ``start``.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            dirnames[:] = sorted(d for d in dirnames if _may_hold(rel_dir + d + "/", prefix, start))
            filenames.sort()
            names = [rel_dir + f for f in filenames if not f.startswith(_TMP_PREFIX)]
            filenames.clear()  # a million names in one directory: hold them once
            # every name here matches when the directory lies inside the prefix and sorts after start
            whole = rel_dir.startswith(prefix) and (start is None or rel_dir > start[:len(rel_dir)])
            yield rel_dir, dirpath, names, whole

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {name} from {self.url}: {exc.strerror or exc}") from exc


def _is_link(entry: os.DirEntry) -> bool:
    """A symbolic link (to a directory: neither walked nor listed, as ``os.walk``)."""
    try:
        return entry.is_symlink()
    except OSError:
        return True


def _may_hold(directory: str, prefix: str, start: str | None) -> bool:
    """Whether names under ``directory`` (ending in ``/``) can start with ``prefix`` and sort at or
    after ``start``: a directory whose path sorts below the start's first characters holds only
    names below it."""
    if not (directory.startswith(prefix) or prefix.startswith(directory)):
        return False
    return start is None or directory >= start[:len(directory)]
