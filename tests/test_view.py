"""``chunkflow view`` (issue 10): the served files, the link's state, and what a browser draws.

The command runs as a real subprocess on real volumes (a precomputed output, a zarr input);
plain HTTP then asks for what Neuroglancer asks for (info, zarr.json, chunks, preflights, byte
ranges). The browser test opens the link in headless Chromium (WebGL through SwiftShader) with
the Neuroglancer client of the ``neuroglancer`` package, and checks the screenshot's pixels;
it skips, saying why, where Chromium, chromedriver, selenium or neuroglancer are missing.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.cli import main
from chunkflow.storage import create_volume

SHAPE = (16, 64, 96)      # Z, Y, X
OFFSET = (8, 32, 64)
CHUNK = (8, 32, 32)
RESOLUTION = (40.0, 8.0, 8.0)
REPO = Path(__file__).resolve().parents[1]


def _pattern(axis: int) -> np.ndarray:
    """C,Z,Y,X float32: 0 in the lower half of ``axis`` (1: y, 2: x of Z,Y,X), 1 in the upper half,
    so a screenshot tells which way the volume lies."""
    data = np.zeros((1, *SHAPE), dtype=np.float32)
    index = [slice(None)] * 4
    index[axis + 1] = slice(SHAPE[axis] // 2, None)
    data[tuple(index)] = 1.0
    return data


def _make(url: str, data: np.ndarray) -> None:
    """A real volume, as tests/helpers.py ``make_input`` makes them, with the given content."""
    volume = create_volume(url, Bbox.from_shape(OFFSET, SHAPE), Vec(CHUNK), 1, "float32", resolution=RESOLUTION,
                           compression="none")  # raw chunks; gzip ones: test_gzip_chunks_...
    volume.write(volume.bbox, data)


def _make_plain_array(path: Path, data: np.ndarray) -> None:
    """chunkflow's zarr format before OME-Zarr: one C,Z,Y,X array placed by its attributes."""
    import zarr

    array = zarr.create_array(store=str(path), shape=data.shape, chunks=(1, *CHUNK), dtype=data.dtype,
                              fill_value=0, zarr_format=3,
                              attributes={"voxel_offset": list(OFFSET), "resolution": list(RESOLUTION)})
    array[...] = data


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict:
    """A precomputed output (bright right half), an OME-Zarr input (bright top half) and a plain
    zarr array (bright right half), all at one offset."""
    root = tmp_path_factory.mktemp("view")
    out, inp, plain = root / "out", root / "inp.zarr", root / "plain.zarr"
    x_halves, y_halves = _pattern(2), 1.0 - _pattern(1)
    _make(f"file://{out}", x_halves)
    _make(str(inp), y_halves)
    _make_plain_array(plain, x_halves)
    return {"out": out, "inp": inp, "plain": plain, "out_data": x_halves, "inp_data": y_halves}


@dataclass
class Running:
    process: subprocess.Popen
    lines: list[str]
    link: str
    server: str | None
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text()


def _start(args: list[str], tmp_path: Path, timeout: float = 60) -> Running:
    """``chunkflow view ARGS`` as a subprocess; returns once it printed its link."""
    stdout, stderr = tmp_path / "view.out", tmp_path / "view.err"
    env = {k: v for k, v in os.environ.items() if k != "CHUNKFLOW_DEBUG"}
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "chunkflow", "view", *args], stdout=out, stderr=err,
                                   cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = stdout.read_text().splitlines()
        if lines and lines[-1].startswith("http"):
            match = re.search(r"from (http://127\.0\.0\.1:\d+) until", lines[0])
            return Running(process, lines, lines[-1], match.group(1) if match else None, stderr)
        if process.poll() is not None:
            raise AssertionError(f"chunkflow view exited {process.returncode}: {stderr.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no link within {timeout} s: {stderr.read_text()}")


def _stop(running: Running) -> tuple[int, str]:
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGINT)
        try:
            running.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()
    return running.process.returncode, running.log()


@pytest.fixture
def view(tmp_path):
    """Start ``chunkflow view``; every one started is stopped (SIGINT, then SIGKILL) at the end."""
    started: list[Running] = []

    def start(*args: str) -> Running:
        directory = tmp_path / f"view{len(started)}"
        directory.mkdir()
        running = _start(list(args), directory)
        started.append(running)
        return running

    yield start
    for running in started:
        _stop(running)


def _get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _state(link: str) -> dict:
    fragment = urllib.parse.urlsplit(link).fragment
    assert fragment.startswith("!"), link
    return json.loads(urllib.parse.unquote(fragment[1:]))


# -- plain HTTP ------------------------------------------------------------------------------

@pytest.mark.integration  # `chunkflow view` serving in a subprocess
def test_link_names_the_layers_and_the_server_answers_what_neuroglancer_asks(volumes, view):
    out, inp, plain = volumes["out"], volumes["inp"], volumes["plain"]
    # a remote client: the state travels in the link's fragment (and no neuroglancer package is needed)
    running = view(f"file://{out}", "--input", f"{inp},{plain}", "--client", "https://ng.example/", "--access-log")
    base = running.server
    assert base and running.link.startswith("https://ng.example/#!")
    state = _state(running.link)
    layers = state["layers"]
    assert [layer["name"] for layer in layers] == ["out", "inp.zarr", "plain.zarr"]
    assert all(layer["type"] == "image" for layer in layers)
    assert layers[0]["source"] == f"precomputed://{base}/data/out/"
    assert layers[1]["source"] == f"zarr3://{base}/data/inp.zarr/"  # OME-Zarr: Neuroglancer reads its metadata
    plain_source = layers[2]["source"]
    assert plain_source["url"] == f"zarr3://{base}/data/plain.zarr/"
    # a plain array's voxel_offset and resolution, which Neuroglancer cannot read, as a transform
    assert list(plain_source["transform"]["outputDimensions"]) == ["c'", "z", "y", "x"]
    assert [row[-1] for row in plain_source["transform"]["matrix"]] == [0, *OFFSET]
    centre_xyz = [o + s / 2 for o, s in zip(OFFSET, SHAPE)][::-1]
    assert state["position"] == centre_xyz
    assert state["dimensions"] == {"x": [8e-9, "m"], "y": [8e-9, "m"], "z": [4e-8, "m"]}

    # the precomputed info file and a chunk, as Neuroglancer names it
    status, headers, body = _get(f"{base}/data/out/info", {"Origin": "https://ng.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    info = json.loads(body)
    assert info == json.loads((out / "info").read_text())
    scale = info["scales"][0]
    x0, y0, z0 = scale["voxel_offset"]
    cx, cy, cz = scale["chunk_sizes"][0]
    chunk = f"{scale['key']}/{x0}-{x0 + cx}_{y0}-{y0 + cy}_{z0}-{z0 + cz}"
    status, headers, body = _get(f"{base}/data/out/{chunk}")
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert "content-range" in headers["access-control-expose-headers"].lower()
    voxels = np.frombuffer(body, dtype=np.float32).reshape(cz, cy, cx)
    np.testing.assert_array_equal(voxels, volumes["out_data"][0, :cz, :cy, :cx])

    # a CORS preflight, byte ranges (first bytes, the last bytes, past the end)
    status, headers, _ = _get(f"{base}/data/out/{chunk}", {
        "Origin": "https://ng.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range", "Access-Control-Request-Private-Network": "true"}, "OPTIONS")
    assert status == 204 and headers["access-control-allow-origin"] == "*"
    assert "GET" in headers["access-control-allow-methods"] and "range" in headers["access-control-allow-headers"]
    assert headers["access-control-allow-private-network"] == "true"
    status, headers, part = _get(f"{base}/data/out/{chunk}", {"Range": "bytes=4-11"})
    assert (status, part, headers["content-range"]) == (206, body[4:12], f"bytes 4-11/{len(body)}")
    assert headers["access-control-allow-origin"] == "*"
    status, _, part = _get(f"{base}/data/out/{chunk}", {"Range": "bytes=-8"})
    assert (status, part) == (206, body[-8:])
    status, headers, _ = _get(f"{base}/data/out/{chunk}", {"Range": f"bytes={len(body)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(body)}"
    status, headers, part = _get(f"{base}/data/out/{chunk}", method="HEAD")
    assert (status, part, headers["content-length"]) == (200, b"", str(len(body)))

    # the OME-Zarr group, its level 0 and a chunk (c/C/Z/Y/X), as zarr3:// reads them
    status, headers, body = _get(f"{base}/data/inp.zarr/zarr.json")
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert json.loads(body)["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    status, headers, body = _get(f"{base}/data/inp.zarr/0/zarr.json")
    assert status == 200 and json.loads(body)["shape"] == [1, *SHAPE]
    status, headers, body = _get(f"{base}/data/inp.zarr/0/c/0/0/0/0")
    assert status == 200 and body == (inp / "0" / "c" / "0" / "0" / "0" / "0").read_bytes()
    assert headers["access-control-allow-origin"] == "*"

    # nothing outside the served directories; a missing chunk is a plain 404 (still with CORS)
    for path in ("/data/out/../../../etc/passwd", "/data/out/%2e%2e/%2e%2e/etc/passwd", "/data/nope/info"):
        status, headers, _ = _get(base + path)
        assert status in (403, 404) and headers["access-control-allow-origin"] == "*", path
    assert _get(f"{base}/data/out/{scale['key']}/0-1_0-1_0-1")[0] == 404

    log = running.log()
    assert f"GET /data/out/{chunk} 200" in log and "GET /data/inp.zarr/0/c/0/0/0/0 200" in log
    code, log = _stop(running)
    assert code == 0
    assert log.strip().splitlines()[-1].startswith("chunkflow: view stopped (")


def test_gzip_chunks_are_sent_encoded_or_decoded_as_the_request_allows(tmp_path):
    """CloudVolume stores a compressed chunk as NAME.gz; Neuroglancer asks for NAME."""
    from cloudvolume import CloudVolume

    from chunkflow.view_server import ViewServer

    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
                                       resolution=[8, 8, 40], voxel_offset=[0, 0, 0], volume_size=[64, 64, 8],
                                       chunk_size=[32, 32, 8])
    cv = CloudVolume(f"file://{tmp_path}/gz", info=info, compress="gzip", progress=False)
    cv.commit_info()
    data = np.arange(64 * 64 * 8, dtype=np.uint64).astype(np.uint8).reshape(64, 64, 8, 1)
    cv[:, :, :] = data
    name = "8_8_40/0-32_0-32_0-8"
    assert (tmp_path / "gz" / f"{name}.gz").exists() and not (tmp_path / "gz" / name).exists()
    raw = gzip.decompress((tmp_path / "gz" / f"{name}.gz").read_bytes())

    server = ViewServer({"gz": tmp_path / "gz"})
    server.start()
    try:
        url = f"{server.data_url('gz')}{name}"
        status, headers, body = _get(url, {"Accept-Encoding": "gzip, deflate"})
        assert status == 200 and headers["content-encoding"] == "gzip" and gzip.decompress(body) == raw
        status, headers, body = _get(url)  # no Accept-Encoding: decoded here
        assert status == 200 and "content-encoding" not in headers and body == raw
        status, headers, body = _get(url, {"Accept-Encoding": "gzip", "Range": "bytes=10-19"})
        assert status == 206 and "content-encoding" not in headers and body == raw[10:20]
        assert headers["content-range"] == f"bytes 10-19/{len(raw)}"
        status, headers, body = _get(server.data_url("gz"))  # a directory: a listing to complete URLs from
        assert status == 200 and b'href="info"' in body and headers["access-control-allow-origin"] == "*"
        (tmp_path / "gz" / "8_8_40" / "32-64_0-32_0-8.gz").write_bytes(b"not gzip")  # a corrupt chunk: 500
        status, headers, _ = _get(f"{server.data_url('gz')}8_8_40/32-64_0-32_0-8")
        assert status == 500 and headers["access-control-allow-origin"] == "*"
        assert _get(url, {"Accept-Encoding": "gzip"})[0] == 200  # and the server goes on
    finally:
        server.shutdown()
        server.server_close()


def test_bucket_volumes_are_linked_directly(gcs_bucket, capsys):
    """gs:// layers need no server: Neuroglancer reads the bucket itself (here a fake GCS server)."""
    from chunkflow.cli import view as cli_view

    _make(f"gs://{gcs_bucket}/jobs/membranes", _pattern(2))
    _make(f"zarr://gs://{gcs_bucket}/em.zarr", _pattern(1))
    main(["view", f"gs://{gcs_bucket}/jobs/membranes", "--input", f"zarr://gs://{gcs_bucket}/em.zarr",
          "--client", "https://ng.example/"])  # nothing local, a remote client: print the link and return
    lines = capsys.readouterr().out.splitlines()
    state = _state(lines[-1])
    assert [layer["source"] for layer in state["layers"]] == [f"precomputed://gs://{gcs_bucket}/jobs/membranes",
                                                             f"zarr3://gs://{gcs_bucket}/em.zarr/"]
    assert [layer["name"] for layer in state["layers"]] == ["membranes", "em.zarr"]
    assert state["position"] == [o + s / 2 for o, s in zip(OFFSET, SHAPE)][::-1]
    assert cli_view.describe(f"zarr://gs://{gcs_bucket}/em.zarr").kind == "ome-zarr"
    with pytest.raises(SystemExit) as info:
        main(["view", f"zarr://gs://{gcs_bucket}/none.zarr"])
    assert info.value.code == 2 and "no volume at" in capsys.readouterr().err


def test_s3_volumes_are_linked_directly(monkeypatch):
    from chunkflow.cli import view as cli_view

    class Opened:
        bbox = Bbox.from_shape(OFFSET, SHAPE)
        resolution = RESOLUTION

    monkeypatch.setattr(cli_view, "open_volume", lambda url: Opened())  # no S3 here
    layer = cli_view.describe("precomputed://s3://bucket/em/")
    assert (layer.source, layer.directory, layer.name) == ("precomputed://s3://bucket/em", None, "em")
    state = cli_view.viewer_state([layer], {})
    link = cli_view.link(cli_view.DEMO_CLIENT, state)
    assert link.startswith("https://neuroglancer-demo.appspot.com/#!") and " " not in link
    assert _state(link) == state


def test_layers_named_alike_get_distinct_names(tmp_path, volumes):
    from chunkflow.cli import view as cli_view

    layers = [cli_view.describe(f"file://{volumes['out']}") for _ in range(3)]
    cli_view.unique_names(layers)
    assert [layer.name for layer in layers] == ["out", "out-2", "out-3"]


@pytest.mark.parametrize("argv, message", [
    (["file:///no/such/volume"], "no volume at file:///no/such/volume"),
    (["/no/such.zarr"], "no volume at /no/such.zarr"),
    (["OUT", "--port", "70000"], "--port 70000 is not a port number"),
    (["OUT", "--client", "ftp://example"], "--client 'ftp://example' is not auto, local"),
    (["OUT", "--bogus", "1"], "unknown flag --bogus for `chunkflow view`"),
    (["OUT", "--input", "/no/such.zarr"], "no volume at /no/such.zarr"),
])
def test_mistakes_end_in_one_line_and_exit_2(volumes, capsys, argv, message):
    argv = [f"file://{volumes['out']}" if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main(["view", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_a_port_in_use_is_refused_in_one_line(volumes, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["view", f"file://{volumes['out']}", "--port", str(port), "--client", "https://ng.example/"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--port {port}: cannot listen" in err and err.count("\n") == 1, err


# -- a real browser --------------------------------------------------------------------------

CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    missing = [what for what, found in (("chromium", chromium), ("chromedriver", driver_path)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    from chunkflow.view_server import viewer_available

    if not viewer_available():
        missing.append("neuroglancer (pip install 'chunkflow[view]'; no internet for the demo client here)")
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _xy_panel(driver, path: Path) -> np.ndarray:
    """The cross-section panel (the first of the 4panel layout) as an RGB array."""
    from PIL import Image

    driver.save_screenshot(str(path))
    image = np.asarray(Image.open(path).convert("RGB"))
    panels = driver.execute_script(
        "return Array.from(document.querySelectorAll('.neuroglancer-rendered-data-panel'))"
        ".map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })")
    if not panels:
        return image[: image.shape[0] // 2, : image.shape[1] // 2]
    scale = driver.execute_script("return window.devicePixelRatio") or 1
    left, top, width, height = (int(v * scale) for v in panels[0])
    return image[top:top + height, left:left + width]


def _data_pixels(panel: np.ndarray) -> np.ndarray:
    """Grey pixels of the data (not the panel's background grey #808080, not coloured outlines)."""
    rgb = panel.astype(int)
    grey = (np.abs(rgb[..., 0] - rgb[..., 1]) < 8) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 8)
    background = np.all(np.abs(rgb - 128) < 6, axis=-1)
    return grey & ~background


@pytest.mark.integration  # `chunkflow view` in a subprocess and a headless browser
@pytest.mark.parametrize("layer, bright", [("out", "right"), ("inp", "top"), ("plain", "right")])
def test_browser_draws_the_layer(volumes, view, browser, tmp_path, layer, bright):
    url = f"file://{volumes['out']}" if layer == "out" else str(volumes[layer])
    running = view(url, "--access-log")  # the default client: the neuroglancer package's, served here
    name = volumes[layer].name
    browser.get_log("browser")  # drop what an earlier page logged
    browser.get(running.link)
    webgl = browser.execute_script(
        "const g = document.createElement('canvas').getContext('webgl2');"
        "return g ? [g.getParameter(g.RENDERER), !!g.getExtension('EXT_color_buffer_float')] : null;")
    if not webgl or not webgl[1]:
        # Neuroglancer needs WebGL2 with float colour buffers before it asks for any data
        assert browser.title == "neuroglancer", browser.page_source[:500]  # the bundled client was served
        pytest.skip(f"no WebGL2 with EXT_color_buffer_float in this headless Chromium ({webgl}): the client "
                    "page loaded, but Neuroglancer fetches and draws nothing without it")
    chunk = re.compile(rf"GET /data/{re.escape(name)}/(?:\d\S*_\d+-\d+|(?:0/)?c/\d+/\d+/\d+/\d+) 200")
    deadline, panel, fraction = time.monotonic() + 90, None, 0.0
    while time.monotonic() < deadline:
        time.sleep(2)
        if chunk.search(running.log()):
            panel = _xy_panel(browser, tmp_path / f"{layer}.png")
            fraction = _data_pixels(panel).mean()
            if fraction > 0.3:
                break
    log = running.log()
    meta = "info" if layer == "out" else "zarr.json"
    assert f"GET /data/{name}/{meta} 200" in log, log  # the page asked our server for the layer ...
    assert chunk.search(log), log                        # ... and for its chunks
    errors = [e["message"] for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and running.server and running.server in e["message"]]
    assert not errors, errors                            # no failed request for the layer's data
    assert fraction > 0.3, f"only {fraction:.0%} of the cross-section panel shows data (see {tmp_path})"
    # the volume lies the right way round: its bright half where the data has it
    mask = _data_pixels(panel)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    grey = panel[..., 0].astype(float)
    h, w = bottom - top, right - left

    def inner(r0: float, r1: float, c0: float, c1: float) -> float:
        """Mean grey of a part of the data's box, as fractions of its height and width."""
        return float(grey[top + int(h * r0):top + int(h * r1), left + int(w * c0):left + int(w * c1)].mean())

    if bright == "right":
        dark, light = inner(0.2, 0.7, 0.2, 0.45), inner(0.2, 0.7, 0.55, 0.8)
    else:
        light, dark = inner(0.1, 0.4, 0.3, 0.7), inner(0.6, 0.85, 0.3, 0.7)
    assert light > 200 and dark < 60, (light, dark, tmp_path)
    code, log = _stop(running)
    assert code == 0 and log.strip().splitlines()[-1].startswith("chunkflow: view stopped ("), log
