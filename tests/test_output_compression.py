"""Compressed precomputed outputs: each offered choice round-trips, read back by chunkflow, by
CloudVolume directly and by tensorstore (a reader we did not write); the rest are refused in one
line naming the valid values, before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import StorageError, create_volume, open_volume
from chunkflow.storage.precomputed_codecs import (COMPRESSION_KEY, JPEG_QUALITY, PNG_LEVEL,
                                                  check_precomputed_compression, layer_compression,
                                                  precomputed_compressions, write_compress)

# Offsets not at 0 and a size that leaves clipped last chunks on every axis.
BOX = Bbox(Vec(3, 10, 20), Vec(3 + 20, 10 + 70, 20 + 45))
CHUNK = Vec(8, 32, 16)
LOSSLESS = {"float32": ("default", "none", "gzip", "fpzip"), "uint8": ("default", "none", "gzip", "png")}
#: largest |difference| of a jpeg output from the exact uint8 output (grey levels), on the demo
#: U-Net's membrane map; docs/formats_precomputed.md measures 32 at quality 85 on a larger volume
JPEG_MAX_ERROR = 40
JPEG_MEAN_ERROR = 2.0


def _data(shape, dtype: str, seed: int = 0) -> np.ndarray:
    """Smooth values in [0, 1] with a little noise (float32), or those scaled to uint8."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(0, 3, n) for n in shape[1:]), indexing="ij")
    smooth = (np.sin(2 * x + y) * np.cos(z + y) + 1) / 2
    data = np.clip(smooth[None] + 0.02 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return np.rint(data * 255).astype(np.uint8) if dtype == "uint8" else data


def _needs(compression: str, dtype: str) -> None:
    if compression not in precomputed_compressions(dtype):
        pytest.skip(f"the codec of {compression} is not installed here")


def _files(tmp_path: Path, name: str) -> list[Path]:
    return [p for p in (tmp_path / name).rglob("*") if p.is_file() and p.name != "info"]


def _tensorstore_read(url: str, box: Bbox) -> np.ndarray:
    """``box`` of the layer at ``url`` read by tensorstore's neuroglancer_precomputed driver, C,Z,Y,X."""
    import tensorstore as ts

    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": url.rstrip("/") + "/"}, read=True).result()
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    return np.ascontiguousarray(store[x0:x1, y0:y1, z0:z1, :].read().result().transpose(3, 2, 1, 0))


def _cloudvolume_read(url: str, box: Bbox) -> np.ndarray:
    from cloudvolume import CloudVolume

    cv = CloudVolume("precomputed://" + url, progress=False)
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    return np.ascontiguousarray(np.asarray(cv[x0:x1, y0:y1, z0:z1]).transpose(3, 2, 1, 0))


def test_choices_per_dtype_and_channels():
    always = ("default", "none", "gzip")
    assert precomputed_compressions("float32")[:3] == always
    assert set(precomputed_compressions("float32")) <= {*always, "fpzip"}
    assert set(precomputed_compressions("uint8")) <= {*always, "png", "jpeg"}
    assert "jpeg" in precomputed_compressions("uint8")  # simplejpeg is a dependency of cloud-volume
    assert precomputed_compressions("uint8", 3) == always
    assert precomputed_compressions("float16") == always


@pytest.mark.parametrize("compression, dtype, channels, says", [
    ("jpeg", "float32", 1, "takes uint8 outputs only, not float32; valid for float32 precomputed outputs: "
                           "default, none, gzip"),
    ("png", "float32", 1, "takes uint8/uint16 outputs only"),
    ("fpzip", "uint8", 1, "takes float32/float64 outputs only, not uint8"),
    ("png", "uint8", 3, "takes one channel only"),
    ("jpeg", "uint8", 2, "valid for 2-channel uint8 precomputed outputs: default, none, gzip"),
    ("compressed_segmentation", "uint8", 1, "is for segmentation (label) layers, not images"),
    ("compresso", "float32", 1, "is for segmentation (label) layers"),
    ("zfpc", "float32", 1, "is not offered"),
    ("zstd", "float32", 1, "is not a precomputed output compression; valid for float32"),
    ("raw", "float32", 1, "is spelled none"),
    ("GZIP", "uint8", 1, "is not a precomputed output compression"),
    (None, "uint8", 1, "None is not a name"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, compression, dtype, channels, says):
    with pytest.raises(StorageError) as err:
        check_precomputed_compression(compression, dtype, channels)
    message = str(err.value)
    assert says in message and "\n" not in message
    assert "valid for" in message and "default, none, gzip" in message
    url = f"file://{tmp_path}/out"
    with pytest.raises(StorageError, match="output compression"):
        create_volume(url, BOX, CHUNK, channels, dtype, compression=compression)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype, channels, compression", [
    (dtype, channels, c) for dtype, choices in LOSSLESS.items() for c in choices for channels in (1, 3)
    if not (c == "png" and channels > 1)])
def test_lossless_choices_read_back_bit_identical(tmp_path, dtype, channels, compression):
    _needs(compression, dtype)
    url = f"file://{tmp_path}/out"
    vol = create_volume(url, BOX, CHUNK, channels, dtype, compression=compression)
    data = _data((channels, *BOX.shape), dtype)
    vol.write(BOX, data)
    # a fresh open, as a worker or a viewer does, and CloudVolume without chunkflow
    again = open_volume(url)
    assert again.compression == compression
    np.testing.assert_array_equal(again.read(BOX), data)
    np.testing.assert_array_equal(_cloudvolume_read(url, BOX), data)
    sub = Bbox(Vec(5, 11, 33), Vec(17, 70, 60))
    np.testing.assert_array_equal(again.read(sub), data[(slice(None), *sub.slices(BOX))])

    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info[COMPRESSION_KEY] == compression
    assert info["scales"][0]["encoding"] == {"default": "raw", "none": "raw", "gzip": "raw"}.get(compression,
                                                                                                  compression)
    assert info["scales"][0].get("png_level") == (PNG_LEVEL if compression == "png" else None)
    files = _files(tmp_path, "out")
    assert len(files) == 3 * 3 * 3  # one object per storage chunk, whatever the compression
    assert all(f.name.endswith(".gz") == (compression == "gzip") for f in files)
    if compression in ("default", "none"):  # on file:// the default is uncompressed files, as before
        assert sum(f.stat().st_size for f in files) == data.nbytes


@pytest.mark.parametrize("dtype, compression", [("float32", "default"), ("float32", "none"), ("float32", "gzip"),
                                                ("uint8", "png")])
def test_tensorstore_reads_what_we_wrote(tmp_path, dtype, compression):
    """tensorstore's neuroglancer_precomputed driver, a reader we did not write, reads the layer
    (it knows no fpzip, as Neuroglancer does not; gzip on gs:// is tested below)."""
    _needs(compression, dtype)
    pytest.importorskip("tensorstore")
    url = f"file://{tmp_path}/out"
    data = _data((1, *BOX.shape), dtype)
    create_volume(url, BOX, CHUNK, 1, dtype, compression=compression).write(BOX, data)
    seen = _tensorstore_read(url, BOX)
    if compression == "gzip":  # file:// gzip objects are NAME.gz, which only CloudVolume looks for
        assert not seen.any()
    else:
        np.testing.assert_array_equal(seen, data)


def test_rewrites_keep_the_layers_compression(tmp_path):
    """Workers open the layer afresh: their writes take the compression from the info file, so a
    chunk is never stored both as NAME and NAME.gz (CloudVolume would read either)."""
    url = f"file://{tmp_path}/out"
    create_volume(url, BOX, CHUNK, 1, "float32", compression="gzip")
    for seed in (1, 2):
        data = _data((1, *BOX.shape), "float32", seed)
        open_volume(url).write(BOX, data)
    files = _files(tmp_path, "out")
    assert len(files) == 27 and all(f.name.endswith(".gz") for f in files)
    np.testing.assert_array_equal(open_volume(url).read(BOX), data)
    # an identical create_volume returns the existing layer, compression and all
    assert create_volume(url, BOX, CHUNK, 1, "float32", compression="gzip").compression == "gzip"


def test_write_compression_per_location():
    info = {"scales": [{"encoding": "raw"}]}
    # default, and layers created before the compression was recorded, are written as they always were
    for recorded in ({}, {COMPRESSION_KEY: "default"}):
        assert write_compress({**info, **recorded}, "file:///data/out") is False
        assert write_compress({**info, **recorded}, "gs://bucket/out") is None  # CloudVolume's gzip for raw
        assert write_compress({**info, **recorded}, "s3://bucket/out") is None
    assert layer_compression(info) == "default"
    for location in ("file:///data/out", "gs://bucket/out", "s3://bucket/out"):
        assert write_compress({**info, COMPRESSION_KEY: "none"}, location) is False
        assert write_compress({**info, COMPRESSION_KEY: "gzip"}, location) == "gzip"
        assert write_compress({**info, COMPRESSION_KEY: "png"}, location) is False


def _membrane_map(shape=(16, 96, 96)) -> np.ndarray:
    """The demo U-Net's membrane probabilities over a synthetic EM volume, as uint8 (0..255)."""
    torch = pytest.importorskip("torch")
    from chunkflow.demo import builtin_paths, make_em_volume
    from chunkflow.demo.unet import build_model

    model = build_model()
    model.load_state_dict(torch.load(builtin_paths("builtin:membrane")[1], weights_only=True))
    model.eval()
    image, _ = make_em_volume(shape, seed=5)
    with torch.inference_mode():
        prob = model(torch.from_numpy(image.astype(np.float32) / 255)[None, None])[0].numpy()
    return np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def test_jpeg_is_lossy_within_the_documented_bound(tmp_path):
    data = _membrane_map()
    box = Bbox.from_shape((0, 0, 0), data.shape[1:])
    url = f"file://{tmp_path}/out"
    vol = create_volume(url, box, Vec(16, 64, 64), 1, "uint8", compression="jpeg")
    vol.write(box, data)
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info["scales"][0]["encoding"] == "jpeg" and info["scales"][0]["jpeg_quality"] == JPEG_QUALITY
    back = open_volume(url).read(box)
    error = np.abs(back.astype(np.int16) - data)
    assert 0 < error.max() <= JPEG_MAX_ERROR and error.mean() <= JPEG_MEAN_ERROR
    assert sum(f.stat().st_size for f in _files(tmp_path, "out")) < data.nbytes / 2
    pytest.importorskip("tensorstore")
    # what CloudVolume decodes is what a reader we did not write decodes
    np.testing.assert_array_equal(_tensorstore_read(url, box), back)


def test_gzip_on_gcs_is_transfer_compression(gcs_bucket, monkeypatch):
    """On gs://, gzip is the objects' Content-Encoding: tensorstore decodes it as CloudVolume does;
    none stores the objects as they are; default is CloudVolume's gzip, as chunkflow always wrote."""
    import os

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    pytest.importorskip("tensorstore")
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", os.environ["STORAGE_EMULATOR_HOST"])
    monkeypatch.setenv("GCE_METADATA_ROOT", "127.0.0.1:1")  # no credential probe off this machine
    bucket = storage.Client(project="chunkflow-test", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    for compression in ("default", "none", "gzip"):
        url = f"gs://{gcs_bucket}/{compression}"
        vol = create_volume(url, BOX, CHUNK, 1, "uint8", compression=compression)
        data = _data((1, *BOX.shape), "uint8")
        vol.write(BOX, data)
        blobs = [b for b in bucket.list_blobs(prefix=f"{compression}/") if not b.name.endswith("/info")]
        assert len(blobs) == 27
        assert {b.content_encoding for b in blobs} == ({None} if compression == "none" else {"gzip"})
        np.testing.assert_array_equal(open_volume(url).read(BOX), data)
        np.testing.assert_array_equal(_tensorstore_read(url, BOX), data)
