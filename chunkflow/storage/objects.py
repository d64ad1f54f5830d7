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
from pathlib import Path
from typing import Iterator

from chunkflow.errors import StorageError
from chunkflow.storage.names import validate_name, validate_prefix

log = logging.getLogger(__name__)

_TMP_PREFIX = ".cftmp-"


class ObjectStore:
    """A flat namespace of ``a/b/c`` names mapping to bytes."""

    url: str

    def put(self, name: str, data: bytes, if_absent: bool = False) -> bool:
        """Store ``data`` atomically. With ``if_absent``, keep an existing object and return False."""
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        """Return the object's bytes; ``KeyError(name)`` if absent."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        """Names (relative to the store root) starting with ``prefix``; bodies are not fetched."""
        for name, _ in self.list_with_sizes(prefix):
            yield name

    def list_with_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        raise NotImplementedError

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class DirectoryStore(ObjectStore):
    """Objects as files under a local directory.

    ``put`` writes a temp file in the target's directory, fsyncs it, then publishes it
    with ``os.replace`` (atomic overwrite) or ``os.link`` (atomic create-if-absent:
    link fails with EEXIST if the name exists). Temp files start with ``.cftmp-`` and
    are never listed.

    The root directory is created by the first ``put``, not when the store is opened,
    so reading commands (``show``, ``inspect``) on a mistyped path leave nothing behind.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"

    def _path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def put(self, name: str, data: bytes, if_absent: bool = False) -> bool:
        path = self._path(name)
        tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
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
            self._fsync_dir(path.parent)
            return True
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StorageError(f"cannot write {name} to {self.url}: {exc.strerror or exc}") from exc

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return f.read()
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

    def list_with_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix pins down.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            for fname in sorted(filenames):
                if fname.startswith(_TMP_PREFIX):
                    continue
                name = rel_dir + fname
                if not name.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, fname)).st_size
                except FileNotFoundError:
                    continue  # deleted while listing
                yield name, size

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {name} from {self.url}: {exc.strerror or exc}") from exc
