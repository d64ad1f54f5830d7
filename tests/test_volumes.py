"""Volumes against real storage: local precomputed and zarr, and both on fake-gcs-server."""
from __future__ import annotations

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import StorageError, create_volume, open_volume

# Offsets not at 0 and a size that leaves clipped last chunks on every axis.
BOX = Bbox(Vec(3, 10, 20), Vec(3 + 20, 10 + 70, 20 + 45))
CHUNK = Vec(8, 32, 16)


def _urls(tmp_path):
    return {
        "precomputed": f"file://{tmp_path}/pre",
        "zarr": str(tmp_path / "vol.zarr"),
    }


@pytest.fixture(params=["precomputed", "zarr"])
def url(request, tmp_path):
    return _urls(tmp_path)[request.param]


def _random(shape, dtype="float32", seed=0):
    return np.random.default_rng(seed).random(shape).astype(dtype)


def test_create_reopen_and_geometry(url):
    vol = create_volume(url, BOX, CHUNK, 2, "float32", resolution=(40.0, 4.0, 4.0))
    again = open_volume(url)
    for v in (vol, again):
        assert v.bbox == BOX
        assert v.chunk_size == CHUNK
        assert v.num_channels == 2
        assert v.dtype == np.float32
        assert v.resolution == (40.0, 4.0, 4.0)
    # identical geometry: returns the existing one
    same = create_volume(url, BOX, CHUNK, 2, "float32", resolution=(40.0, 4.0, 4.0))
    assert same.bbox == BOX
    with pytest.raises(StorageError, match="different geometry.*chunk_size"):
        create_volume(url, BOX, Vec(8, 16, 16), 2, "float32", resolution=(40.0, 4.0, 4.0))
    with pytest.raises(StorageError, match="different geometry.*num_channels"):
        create_volume(url, BOX, CHUNK, 1, "float32", resolution=(40.0, 4.0, 4.0))


def test_round_trip_whole_and_clipped_edge(url):
    vol = create_volume(url, BOX, CHUNK, 2, "float32")
    data = _random((2, *BOX.shape))
    vol.write(BOX, data)
    np.testing.assert_array_equal(vol.read(BOX), data)
    np.testing.assert_array_equal(open_volume(url).read(BOX), data)
    # an interior, unaligned read
    sub = Bbox(Vec(5, 11, 33), Vec(17, 70, 60))
    np.testing.assert_array_equal(vol.read(sub), data[(slice(None), *sub.slices(BOX))])
    # rewrite only the far-corner (edge-clipped) chunk
    corner = Bbox(BOX.start + CHUNK * Vec(2, 2, 2), BOX.stop)
    assert corner.shape == Vec(4, 6, 13)
    patch = _random((2, *corner.shape), seed=1)
    vol.write(corner, patch)
    data[(slice(None), *corner.slices(BOX))] = patch
    np.testing.assert_array_equal(vol.read(BOX), data)


def test_never_written_chunks_read_zero(url):
    vol = create_volume(url, BOX, CHUNK, 1, "uint8")
    out = vol.read(BOX)
    assert out.shape == (1, *BOX.shape) and out.dtype == np.uint8 and not out.any()


def test_padding_modes(url):
    vol = create_volume(url, BOX, CHUNK, 1, "float32")
    data = _random((1, *BOX.shape))
    vol.write(BOX, data)
    outside = BOX.grow((2, 3, 4))
    with pytest.raises(StorageError) as err:
        vol.read(outside)
    assert outside.name in str(err.value) and BOX.name in str(err.value)
    widths = [(0, 0), (2, 2), (3, 3), (4, 4)]
    np.testing.assert_array_equal(vol.read(outside, pad_mode="constant"), np.pad(data, widths))
    np.testing.assert_array_equal(vol.read(outside, pad_mode="reflect"), np.pad(data, widths, mode="reflect"))
    far = Bbox(BOX.stop + 5, BOX.stop + 9)
    assert not vol.read(far, pad_mode="constant").any()
    with pytest.raises(StorageError):
        vol.read(far, pad_mode="reflect")


def test_unaligned_write_refused_and_nothing_written(url):
    vol = create_volume(url, BOX, CHUNK, 1, "float32")
    bad_boxes = [
        Bbox(BOX.start + Vec(1, 0, 0), BOX.start + CHUNK + Vec(1, 0, 0)),  # start off grid
        Bbox(BOX.start, BOX.start + Vec(8, 32, 15)),  # stop off grid, not the far face
        Bbox(BOX.start - Vec(8, 0, 0), BOX.start + CHUNK),  # outside
    ]
    for bad in bad_boxes:
        with pytest.raises(StorageError, match=bad.name):
            vol.write(bad, np.ones((1, *bad.shape), np.float32))
    assert not vol.read(BOX).any()


def test_dtype_and_shape_mismatch_refused(url):
    vol = create_volume(url, BOX, CHUNK, 2, "float32")
    box = Bbox(BOX.start, BOX.start + CHUNK)
    with pytest.raises(StorageError, match="dtype float64"):
        vol.write(box, np.ones((2, *box.shape), np.float64))
    with pytest.raises(StorageError, match="shape"):
        vol.write(box, np.ones((1, *box.shape), np.float32))
    assert not vol.read(BOX).any()


def test_missing_and_unsupported_urls(tmp_path):
    with pytest.raises(StorageError, match="no volume at"):
        open_volume(f"file://{tmp_path}/nothing")
    with pytest.raises(StorageError, match="no volume at"):
        open_volume(str(tmp_path / "nothing.zarr"))
    for bad in ("http://example.com/x", "relative/path", "/abs/no_suffix", "zarr://s3://b/x.zarr"):
        with pytest.raises(StorageError, match="supported volume URLs"):
            open_volume(bad)


def test_zarr_3d_is_one_channel(tmp_path):
    import zarr

    path = str(tmp_path / "three.zarr")
    arr = zarr.create_array(path, shape=(16, 32, 32), chunks=(8, 16, 16), dtype="float32",
                            attributes={"voxel_offset": [4, 0, 8], "resolution": [30, 6, 6]})
    arr[:] = 1.5
    vol = open_volume(f"zarr://{path}")
    assert vol.num_channels == 1 and vol.bbox == Bbox(Vec(4, 0, 8), Vec(20, 32, 40))
    assert vol.resolution == (30.0, 6.0, 6.0)
    box = Bbox(Vec(12, 16, 8), Vec(20, 32, 24))
    vol.write(box, np.full((1, *box.shape), 2.0, np.float32))
    out = vol.read(vol.bbox)
    assert out.shape == (1, 16, 32, 32)
    assert out.sum() == pytest.approx(1.5 * 16 * 32 * 32 + 0.5 * box.size)


def test_large_region_is_fast(url):
    import time

    box = Bbox(Vec(0, 0, 0), Vec(32, 256, 256))
    vol = create_volume(url, box, Vec(16, 128, 128), 1, "float32")
    data = _random((1, *box.shape))
    t0 = time.perf_counter()
    vol.write(box, data)
    out = vol.read(box)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(out, data)
    assert elapsed < 5.0, f"32x256x256 float32 write+read took {elapsed:.2f}s"


@pytest.mark.parametrize("kind", ["precomputed", "zarr"])
def test_gcs_round_trip(gcs_bucket, kind):
    url = f"gs://{gcs_bucket}/vol" if kind == "precomputed" else f"zarr://gs://{gcs_bucket}/vol.zarr"
    vol = create_volume(url, BOX, CHUNK, 2, "float32")
    data = _random((2, *BOX.shape), seed=3)
    vol.write(BOX, data)
    again = open_volume(url)
    assert again.bbox == BOX and again.chunk_size == CHUNK
    np.testing.assert_array_equal(again.read(BOX), data)
    with pytest.raises(StorageError):
        vol.write(Bbox(BOX.start + 1, BOX.stop), data[:, 1:, 1:, 1:])
    with pytest.raises(StorageError, match="no volume at"):
        open_volume(url.replace("vol", "other"))


@pytest.mark.parametrize("kind", ["precomputed", "zarr"])
def test_gcs_missing_bucket_is_named(gcs_server, kind):
    import uuid

    missing = f"missing-{uuid.uuid4().hex[:8]}"
    url = f"gs://{missing}/vol" if kind == "precomputed" else f"zarr://gs://{missing}/vol.zarr"
    with pytest.raises(StorageError) as err:
        open_volume(url)
    assert str(err.value) == f"bucket {missing} does not exist (open {url})"
    with pytest.raises(StorageError) as err:
        create_volume(url, BOX, CHUNK, 1, "float32")
    assert str(err.value) == f"bucket {missing} does not exist (create {url})"


def test_gcs_volume_opens_where_listing_is_forbidden(gcs_server, gcs_bucket, monkeypatch):
    """The bucket probe lists one object; a 403 on that list is no verdict (the caller may read
    objects without listing them), so the volume still opens and reads."""
    from tests.test_inspect import PolicyProxy

    url = f"gs://{gcs_bucket}/vol"
    data = _random((1, *BOX.shape), seed=5)
    create_volume(url, BOX, CHUNK, 1, "float32").write(BOX, data)
    denied = []

    def deny_listing(method, path):
        if method == "GET" and path.split("?")[0].rstrip("/").endswith(f"/b/{gcs_bucket}/o"):
            denied.append(path)
            return True
        return False

    proxy = PolicyProxy(gcs_server, deny_listing)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)  # a new endpoint: probed afresh
        monkeypatch.setenv("CHUNKFLOW_GCS_RETRY_DEADLINE", "2")
        np.testing.assert_array_equal(open_volume(url).read(BOX), data)
    finally:
        proxy.close()
    assert denied  # the probe did ask, and was refused
