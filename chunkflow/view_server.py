"""A small threaded HTTP server that lets Neuroglancer read local volumes (``chunkflow view``).

It serves each mounted directory (a precomputed layer, a zarr array or OME-Zarr group) under
``/data/NAME/``, read-only, on 127.0.0.1. :class:`LocalViewer` starts the Neuroglancer client
that the optional ``neuroglancer`` package bundles (its own server, on a second port), so the
link works without the internet.

What Neuroglancer needs from a server, and what a plain ``python -m http.server`` lacks:

* ``Access-Control-Allow-Origin: *`` on every answer (the page may come from another origin),
  with ``Content-Range`` exposed, and ``OPTIONS`` preflights answered (``Range`` is not a
  CORS-safelisted header for every value; Chrome's private-network preflight is allowed too);
* ``Range`` requests (``bytes=a-b``, ``a-``, ``-n``): sharded precomputed and zarr shards are
  read by byte range; an unsatisfiable range is 416;
* precomputed chunks that CloudVolume stored compressed (``NAME.gz``, ``.br``, ``.zstd``;
  Neuroglancer asks for ``NAME``): sent as they are with ``Content-Encoding`` when the browser
  accepts that encoding and asked for no range, else decompressed here (cloud-files' codecs);
* a directory asked for is an HTML listing (Neuroglancer's completion of http URLs reads it).

Every request is logged on the ``chunkflow.view`` logger (INFO with ``access_log``, else DEBUG).
"""
from __future__ import annotations

import html
import importlib.util
import logging
import os
import posixpath
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("chunkflow.view")

#: where the data is mounted on the server: /data/NAME/
DATA_PREFIX = "/data/"
#: compressed variants CloudVolume may store for a file, with their HTTP Content-Encoding
ENCODED_SUFFIXES = ((".gz", "gzip"), (".br", "br"), (".zstd", "zstd"), (".xz", "xz"), (".bz2", "bzip2"))
#: the encodings a browser decodes itself
BROWSER_ENCODINGS = ("gzip", "br", "zstd")
CONTENT_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8"}
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Range, Content-Length, Content-Encoding, Accept-Ranges",
}


def viewer_available() -> bool:
    """Whether the ``neuroglancer`` package (``pip install 'chunkflow[view]'``) is installed: it
    bundles the Neuroglancer client. Checked without importing it."""
    return importlib.util.find_spec("neuroglancer") is not None


class LocalViewer:
    """The ``neuroglancer`` package's viewer server on 127.0.0.1:``port`` (0: a free one),
    holding ``state``; :attr:`url` opens it. Keep the object: the package's server forgets a
    viewer that is garbage-collected (its URL then answers 404).

    That client is the one built for the package: it takes its state from its server (a link
    with the state in a ``#!`` fragment is opened, but unsynchronised, and the page retries
    its server connection forever), so the state is set here and the link carries none."""

    def __init__(self, state: dict, port: int = 0) -> None:
        import neuroglancer

        neuroglancer.set_server_bind_address("127.0.0.1", bind_port=port)
        self.viewer = neuroglancer.Viewer()
        self.viewer.set_state(neuroglancer.ViewerState(state))
        self.url: str = self.viewer.get_viewer_url()

    def stop(self) -> None:
        import neuroglancer

        neuroglancer.stop()


class ViewServer(ThreadingHTTPServer):
    """``ViewServer(mounts, port)``: ``mounts`` maps a NAME (one URL path segment) to a local
    directory served under ``/data/NAME/``. Port 0 picks a free port; :attr:`url` says which.
    Binds 127.0.0.1 only."""

    daemon_threads = True
    allow_reuse_address = True
    #: Neuroglancer opens many connections at once
    request_queue_size = 64

    def __init__(self, mounts: dict[str, Path], port: int = 0, host: str = "127.0.0.1",
                 access_log: bool = False) -> None:
        for name in mounts:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"mount name {name!r} is not one path segment")
        self.mounts = {name: Path(path) for name, path in mounts.items()}
        self.access_log = access_log
        self.requests = 0
        self._count_lock = threading.Lock()
        super().__init__((host, port), ViewHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def data_url(self, name: str) -> str:
        """The http URL of mount ``name``, with a trailing slash."""
        return f"{self.url}{DATA_PREFIX}{urllib.parse.quote(name)}/"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, and the command while it waits for Ctrl-C)."""
        thread = threading.Thread(target=self.serve_forever, name="chunkflow-view", daemon=True)
        thread.start()
        return thread

    def count(self) -> None:
        with self._count_lock:
            self.requests += 1

    def handle_error(self, request, client_address) -> None:
        # A browser that cancels a request it no longer needs resets the connection: not news.
        log.debug("request from %s failed", client_address, exc_info=True)


class ViewHandler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"
    server_version = "chunkflow-view"

    # -- methods --------------------------------------------------------------------
    def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
        """A CORS preflight: allow any origin to GET/HEAD with any request headers."""
        self.server.count()
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or "range, content-type")
        if self.headers.get("Access-Control-Request-Private-Network"):
            self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self.server.count()
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.count()
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        try:
            self._serve(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser cancelled a request it no longer needed
        except Exception as err:  # noqa: BLE001 - e.g. a corrupt .gz: answer 500, keep serving
            log.warning("%s %s failed: %s: %s", self.command, self.path, type(err).__name__, err)
            self.close_connection = True
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}", body)
            except OSError:
                pass

    # -- routing --------------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if not path.startswith(DATA_PREFIX):
            return self._index(path, body)
        name, _, rest = path[len(DATA_PREFIX):].partition("/")
        root = self.server.mounts.get(name)
        if root is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no layer {name!r} here", body)
        target = _inside(root, rest)
        if target is None:
            return self._error(HTTPStatus.FORBIDDEN, "path outside the served directory", body)
        if target.is_dir():
            if path.endswith("/"):
                return self._listing(target, path, body)
            return self._redirect(path + "/", body)
        if target.is_file():
            return self._file(target, None, body)
        for suffix, encoding in ENCODED_SUFFIXES:
            stored = target.with_name(target.name + suffix)
            if stored.is_file():
                return self._file(stored, encoding, body)
        self._error(HTTPStatus.NOT_FOUND, "not found", body)

    # -- answers --------------------------------------------------------------------
    def _file(self, path: Path, encoding: str | None, body: bool) -> None:
        """A file, whole or a byte range; a stored encoding is passed on or decoded here."""
        wanted = self.headers.get("Range")
        accepted = {e.split(";")[0].strip() for e in self.headers.get("Accept-Encoding", "").split(",")}
        data: bytes | None = None
        if encoding is not None and (wanted or encoding not in BROWSER_ENCODINGS or encoding not in accepted):
            from cloudfiles.compression import decompress

            data = decompress(path.read_bytes(), encoding, filename=str(path))
            encoding = None
        size = len(data) if data is not None else path.stat().st_size
        span = _parse_range(wanted, size) if wanted else None
        if span == "unsatisfiable":
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self._cors()
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, stop = span if isinstance(span, tuple) else (0, size)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if isinstance(span, tuple) else HTTPStatus.OK)
        self._cors()
        self.send_header("Content-Type", _content_type(path, encoding))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-cache")  # a job may still be writing the volume
        if encoding is not None:
            self.send_header("Content-Encoding", encoding)
        if isinstance(span, tuple):
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        if not body:
            return
        if data is not None:
            self.wfile.write(data[start:stop])
            return
        with open(path, "rb") as f:
            f.seek(start)
            _copy(f, self.wfile, stop - start)

    def _index(self, path: str, body: bool) -> None:
        """``/``: the layers served here; anything else outside ``/data/`` is not found."""
        if path != "/":
            return self._error(HTTPStatus.NOT_FOUND, "not found (layers are under /data/)", body)
        names = sorted(self.server.mounts)
        self._text(HTTPStatus.OK, "<!doctype html><title>chunkflow view</title><pre>\n" + "".join(
            f'<a href="{DATA_PREFIX}{html.escape(urllib.parse.quote(n))}/">{html.escape(n)}</a>\n' for n in names)
            + "</pre>\n", "text/html; charset=utf-8", body)

    def _listing(self, directory: Path, path: str, body: bool) -> None:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
        links = "".join(f'<a href="{html.escape(urllib.parse.quote(n))}">{html.escape(n)}</a>\n' for n in names)
        self._text(HTTPStatus.OK, f"<!doctype html><title>{html.escape(path)}</title><pre>\n{links}</pre>\n",
                   "text/html; charset=utf-8", body)

    def _redirect(self, location: str, body: bool) -> None:
        self.send_response(HTTPStatus.MOVED_PERMANENTLY)
        self._cors()
        self.send_header("Location", urllib.parse.quote(location))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _error(self, status: HTTPStatus, message: str, body: bool) -> None:
        self._text(status, message + "\n", "text/plain; charset=utf-8", body)

    def _text(self, status: HTTPStatus, text: str, content_type: str, body: bool) -> None:
        payload = text.encode()
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _cors(self) -> None:
        for name, value in CORS_HEADERS.items():
            self.send_header(name, value)

    def log_request(self, code="-", size="-") -> None:
        if isinstance(code, HTTPStatus):
            code = code.value
        log.log(logging.INFO if self.server.access_log else logging.DEBUG, "%s %s %s%s",
                self.command, self.path, code, f" range={self.headers['Range']}" if self.headers.get("Range") else "")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative``, or None if ``relative`` climbs out of ``root`` (``..``, absolute)."""
    normal = posixpath.normpath("/" + relative).lstrip("/")
    parts = [p for p in normal.split("/") if p]
    if any(p in ("..", ".") for p in parts) or "\\" in relative or "\0" in relative:
        return None
    return root.joinpath(*parts) if parts else root


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """``(start, stop)`` of one ``bytes=`` range; ``"unsatisfiable"``; None to ignore the header
    (malformed, or several ranges: the whole body is an allowed answer to those)."""
    match = RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        return (max(size - n, 0), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    stop = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, stop


def _content_type(path: Path, encoding: str | None) -> str:
    name = path.name
    if encoding is not None:
        name = name.rsplit(".", 1)[0]
    if name in ("info", "zarr.json", ".zarray", ".zattrs", ".zgroup", "provenance"):
        return "application/json"
    return CONTENT_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")


def _copy(source, sink, length: int) -> None:
    remaining = length
    while remaining > 0:
        block = source.read(min(remaining, 1 << 20))
        if not block:
            break
        sink.write(block)
        remaining -= len(block)


__all__ = ["DATA_PREFIX", "ViewServer", "LocalViewer", "viewer_available"]
