"""``chunkflow view OUTPUT [--input IN1,IN2]``: a Neuroglancer link that opens volumes, served from here.

Local volumes (precomputed ``file://`` directories, zarr arrays, OME-Zarr groups) are served by
:class:`chunkflow.view_server.ViewServer` on 127.0.0.1; ``gs://`` and ``s3://`` volumes are
linked directly (Neuroglancer reads the bucket itself). The viewer state has one image layer per
volume, named after the URL's last component, the view centred on the first volume.

The Neuroglancer client comes from the optional ``neuroglancer`` package (``pip install
'chunkflow[view]'``), served by that package on a second local port, so the link works without
the internet. Without it (or with ``--client URL``) the link opens a Neuroglancer deployment
(https://neuroglancer-demo.appspot.com by default) with the state in its fragment (``#!{json}``).
"""
from __future__ import annotations

import json
import logging
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from chunkflow.cli.common import setup_logging, user_errors
from chunkflow.errors import StorageError, UsageError
from chunkflow.interruptible import forever
from chunkflow.storage import open_volume
from chunkflow.storage.volume_urls import volume_format, volume_location

log = logging.getLogger("chunkflow.view")

DEMO_CLIENT = "https://neuroglancer-demo.appspot.com/"
INSTALL_HINT = "pip install 'chunkflow[view]'"


@dataclass
class Layer:
    """One volume to show: where Neuroglancer reads it, and where it sits (XYZ, nm)."""

    url: str
    name: str
    #: Neuroglancer data source: a URL, or ``{mount}`` in place of the served http URL
    source: str
    #: served from this local directory (None: Neuroglancer reads a bucket directly)
    directory: Path | None = None
    #: a source transform (zarr arrays: chunkflow's voxel_offset/resolution attributes)
    transform: dict | None = None
    centre_xyz: tuple[float, float, float] | None = None
    resolution_xyz: tuple[float, float, float] | None = None
    extent_xyz: tuple[int, int, int] | None = None
    #: precomputed, zarr (a plain array) or ome-zarr
    kind: str = "precomputed"

    def layer_json(self, data_url: str | None) -> dict:
        url = self.source.replace("{mount}", data_url or "")
        source: str | dict = {"url": url, "transform": self.transform} if self.transform else url
        return {"type": "image", "source": source, "name": self.name}


def describe(url: str) -> Layer:
    """A :class:`Layer` for a volume URL; :class:`StorageError` if there is no volume there."""
    fmt = volume_format(url)
    location = volume_location(url)
    name = location.rstrip("/").rsplit("/", 1)[-1] or location
    remote = "://" in location
    if fmt == "precomputed":
        volume = open_volume(url)
        layer = Layer(url, name, "precomputed://" + location if remote else "precomputed://{mount}",
                      None if remote else Path(location))
        _place(layer, volume.bbox.start, volume.bbox.shape, volume.resolution)
        return layer
    return _describe_zarr(url, name, location, remote)


def _describe_zarr(url: str, name: str, location: str, remote: bool) -> Layer:
    if location.startswith("gs://"):
        from chunkflow.storage.gcs_probe import probe_bucket

        probe_bucket(url, location, "open")  # a missing bucket in one line, not minutes of retries
    meta, version = _zarr_metadata(location)
    if meta is None:
        raise StorageError(f"no volume at {url} (no zarr.json or .zarray there)")
    mount = location.rstrip("/") + "/" if remote else "{mount}"
    layer = Layer(url, name, f"zarr{version}://{mount}", None if remote else Path(location), kind="zarr")
    attrs = meta.get("attributes", {}) if version == 3 else meta
    if meta.get("node_type") == "group" or version == 2 and "shape" not in meta:
        if "multiscales" not in attrs and "multiscales" not in attrs.get("ome", {}):
            raise StorageError(f"{url} is a zarr group without OME-Zarr multiscales metadata; give an array")
        # OME-Zarr (what chunkflow writes): Neuroglancer reads its scales, axes and offset itself
        layer.kind = "ome-zarr"
        try:
            volume = open_volume(url)
        except StorageError as err:  # axes or levels chunkflow does not read: still worth a look
            log.info("%s: no position from it (%s)", url, err)
            return layer
        _place(layer, volume.bbox.start, volume.bbox.shape, volume.resolution)
        return layer
    volume = open_volume(url)
    ndim = len(meta.get("shape", ()))
    if ndim in (3, 4):
        # a plain array: chunkflow's voxel_offset/resolution (or its OME parent's) as a transform
        layer.transform = _zarr_transform(ndim, volume.bbox.start, volume.resolution)
        _place(layer, volume.bbox.start, volume.bbox.shape, volume.resolution)
    return layer


def _zarr_metadata(location: str) -> tuple[dict | None, int]:
    """The zarr metadata at a directory or fsspec URL: (zarr.json, 3), (.zarray and .zattrs
    merged, 2), or (None, 3) when there is none."""
    v3 = _read_json(location, "zarr.json")
    if v3 is not None:
        return v3, 3
    found = [m for m in (_read_json(location, ".zattrs"), _read_json(location, ".zarray")) if m is not None]
    if not found:
        return None, 3
    return {k: v for m in found for k, v in m.items()}, 2


def _read_json(location: str, name: str) -> dict | None:
    """A JSON object in a local directory or under an fsspec URL (gs://); None if absent."""
    where = location.rstrip("/") + "/" + name
    try:
        if "://" in location:
            import fsspec

            with fsspec.open(where, "rb") as f:
                text = f.read()
        else:
            text = Path(where).read_bytes()
        value = json.loads(text)
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - OSError, bad JSON, and fsspec back ends' own kinds
        raise StorageError(f"cannot read zarr metadata {where}: {type(err).__name__}: {err}") from None
    if not isinstance(value, dict):
        raise StorageError(f"zarr metadata {where} is not a JSON object")
    return value


def _zarr_transform(ndim: int, offset_zyx, resolution_zyx) -> dict:
    """Map a chunkflow zarr array (C,Z,Y,X or Z,Y,X voxels) onto z, y, x in nm at its voxel
    offset: Neuroglancer knows neither attribute (they are chunkflow's, not OME's).

    Neuroglancer gives an array without OME metadata unitless dimensions of scale 1, and scales
    the matrix by input scale / output scale, so the diagonal holds the voxel size in metres
    (one unitless voxel becomes one output voxel); the offset is in output voxels."""
    names = (["c'"] if ndim == 4 else []) + ["z", "y", "x"]
    scales = ([1.0] if ndim == 4 else []) + [float(r) * 1e-9 for r in resolution_zyx]
    shift = ([0] if ndim == 4 else []) + [int(v) for v in offset_zyx]
    outputs = {name: [scale, "" if name == "c'" else "m"] for name, scale in zip(names, scales)}
    matrix = [[scales[i] if j == i else 0 for j in range(ndim)] + [shift[i]] for i in range(ndim)]
    return {"outputDimensions": outputs, "matrix": matrix}


def _place(layer: Layer, start_zyx, shape_zyx, resolution_zyx) -> None:
    layer.centre_xyz = tuple(float(s) + float(n) / 2 for s, n in zip(start_zyx, shape_zyx))[::-1]  # type: ignore[assignment]
    layer.resolution_xyz = tuple(float(r) for r in resolution_zyx)[::-1]  # type: ignore[assignment]
    layer.extent_xyz = tuple(int(n) for n in shape_zyx)[::-1]  # type: ignore[assignment]


def unique_names(layers: list[Layer]) -> None:
    """Layers named alike get ``-2``, ``-3``: Neuroglancer keys layers (and we mounts) by name."""
    taken: set[str] = set()
    for layer in layers:
        name, n = layer.name, 1
        while name in taken:
            n += 1
            name = f"{layer.name}-{n}"
        layer.name = name
        taken.add(name)


def viewer_state(layers: list[Layer], data_urls: dict[str, str]) -> dict:
    """Neuroglancer's JSON state: the layers, and the first layer's voxel grid and centre."""
    state: dict = {}
    first = layers[0]
    if first.centre_xyz is not None and first.resolution_xyz is not None:
        state["dimensions"] = {axis: [r * 1e-9, "m"] for axis, r in zip("xyz", first.resolution_xyz)}
        state["position"] = list(first.centre_xyz)
    if first.extent_xyz is not None:
        # a small volume fills its panels; a large one opens at one voxel per pixel (zooming out
        # over one resolution level would fetch every chunk in sight)
        x, y, _ = first.extent_xyz
        state["crossSectionScale"] = min(1.0, round(max(x / 500, y / 300), 4))
    state["layers"] = [layer.layer_json(data_urls.get(layer.name)) for layer in layers]
    state["selectedLayer"] = {"layer": first.name}
    state["layout"] = "4panel"
    return state


def link(client: str, state: dict) -> str:
    """``CLIENT#!{state}``, the state URL-encoded (a link a terminal can open whole)."""
    text = json.dumps(state, separators=(",", ":"))
    return client.rstrip("/") + "/#!" + urllib.parse.quote(text, safe="")


def _inputs(value) -> list[str]:
    """--input as Fire parsed it: one URL, URLs separated by commas, or a list of URLs."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise UsageError(f"--input {value!r} is not a volume URL or URLs separated by commas")
    urls = [item.strip() for item in items if item.strip()]
    if not urls:
        raise UsageError(f"--input {value!r} names no volume")
    return urls


def _check(port, client_port, client, access_log, quiet) -> None:
    for flag, value in (("port", port), ("client-port", client_port)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise UsageError(f"--{flag} {value!r} is not a port number (0 for a free one, or 1..65535)")
    if not isinstance(client, str) or not (client in ("auto", "local") or client.startswith(("http://", "https://"))):
        raise UsageError(f"--client {client!r} is not auto, local or the http(s):// URL of a Neuroglancer client")
    for flag, value in (("access-log", access_log), ("quiet", quiet)):
        if not isinstance(value, bool):
            raise UsageError(f"--{flag} takes no value (got {value!r}); put it after the volumes")


def _remote_client(choice: str) -> str | None:
    """The base URL of the Neuroglancer client the link opens; None for the bundled one."""
    from chunkflow.view_server import viewer_available

    if choice.startswith(("http://", "https://")):
        return choice
    if viewer_available():
        return None
    if choice == "local":
        raise UsageError(f"--client local needs the neuroglancer package: {INSTALL_HINT}")
    log.warning("hint: %s to serve the Neuroglancer client from here; this link loads it from %s (needs the "
                "internet)", INSTALL_HINT, DEMO_CLIENT)
    return DEMO_CLIENT


@user_errors
def view(output: str, input: str | None = None, port: int = 0, client_port: int = 0, client: str = "auto",
         access_log: bool = False, quiet: bool = False) -> None:
    """Serve OUTPUT (and --input volumes) to Neuroglancer on 127.0.0.1 and print a link that opens them.

    Local volumes (file:///path precomputed, PATH.zarr) are served read-only with the CORS
    headers Neuroglancer needs; gs:// and s3:// volumes are linked directly. Serves until
    Ctrl-C (one line on stderr, exit 0); with only bucket volumes and a remote --client it
    just prints the link. From another machine: ssh -L for --port and --client-port.

    Args:
        output: a volume: file:///path or gs://bucket/path (precomputed), PATH.zarr, zarr://gs://bucket/path.zarr.
        input: more volumes, separated by commas, shown as further layers (e.g. the job's input).
        port: port of the data server (default 0: a free one).
        client_port: port of the bundled Neuroglancer client (default 0: a free one).
        client: auto (the client bundled with the neuroglancer package if installed, else
            neuroglancer-demo.appspot.com), local (the bundled one), or the URL of a Neuroglancer deployment.
        access_log: log every request for data (method, path, status, range) on stderr.
        quiet: no log lines.
    """
    _check(port, client_port, client, access_log, quiet)
    if not isinstance(output, str):
        raise UsageError(f"OUTPUT {output!r} is not a volume URL")
    urls = [output, *_inputs(input)]
    setup_logging(quiet)
    logging.getLogger("tornado").setLevel(logging.ERROR)  # the bundled client's server: favicon 404s
    layers = [describe(url) for url in urls]
    unique_names(layers)
    remote_client = _remote_client(client)
    served = {layer.name: layer.directory for layer in layers if layer.directory is not None}
    server = _data_server(served, port, access_log) if served else None
    viewer = None
    try:
        data_urls = {name: server.data_url(name) for name in served} if server else {}
        state = viewer_state(layers, data_urls)
        if remote_client is None:
            from chunkflow.view_server import LocalViewer

            try:
                viewer = LocalViewer(state, client_port)
            except OSError as err:
                raise UsageError(f"--client-port {client_port}: cannot listen on 127.0.0.1:{client_port} "
                                 f"({err.strerror or err})") from None
            url = viewer.url
        else:
            url = link(remote_client, state)
        if server is not None:
            print(f"serving {len(served)} of {len(layers)} layers from {server.url} until Ctrl-C")
        elif viewer is not None:
            print("serving the Neuroglancer client until Ctrl-C (every layer is read from its bucket)")
        _print_layers(layers, data_urls)
        print(url, flush=True)
        if server is None and viewer is None:
            return  # nothing served from here: the link is all
        _wait(server)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (raise_on_sigterm): the way a server ends
        served_requests = server.requests if server is not None else 0
        print(f"chunkflow: view stopped ({served_requests} data requests served)", file=sys.stderr)
    finally:
        if server is not None:
            server.server_close()
        if viewer is not None:
            viewer.stop()


def _data_server(served: dict[str, Path], port: int, access_log: bool):
    from chunkflow.view_server import ViewServer

    try:
        return ViewServer(served, port=port, access_log=access_log)
    except OSError as err:
        raise UsageError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror or err})") from None


def _wait(server) -> None:
    """Serve until interrupted (the bundled client's server runs in its own thread)."""
    if server is not None:
        server.serve_forever()
    else:
        forever()


def _print_layers(layers: list[Layer], data_urls: dict[str, str]) -> None:
    width = max(len(layer.name) for layer in layers)
    for layer in layers:
        source = layer.source.replace("{mount}", data_urls.get(layer.name, ""))
        print(f"  {layer.name:<{width}}  {layer.kind:<11}  {source}  ({layer.url})")
