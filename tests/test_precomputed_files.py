"""Local precomputed chunk files read and written without CloudVolume (chunkflow/storage/precomputed_files.py)
give the same bytes as CloudVolume: the same files on disk, the same arrays read back (through CloudVolume,
tensorstore and chunkflow), the same missing-chunk rules."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import MissingInput
from chunkflow.storage import StorageError, create_volume, open_volume
from chunkflow.storage.precomputed import PrecomputedVolume
from tests.helpers import examples

DTYPES = ("uint8", "uint16", "int16", "float32", "uint64", "float64")


def _through_cloudvolume(vol: PrecomputedVolume) -> PrecomputedVolume:
    """``vol`` with its chunk files left to CloudVolume (the reference)."""
    assert vol._files is not None
    vol._files = None
    return vol


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _data(shape, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@st.composite
def layers(draw):
    """A layer (offset, size, chunk: ZYX; channels; dtype), one chunk-aligned box in it, one any box."""
    chunk = Vec(*(draw(st.integers(1, 9)) for _ in range(3)))
    size = Vec(*(draw(st.integers(1, 3 * c + 2)) for c in chunk))
    offset = Vec(*(draw(st.integers(-20, 20)) for _ in range(3)))
    grid = [-(-s // c) for s, c in zip(size, chunk)]
    lo = [draw(st.integers(0, g - 1)) for g in grid]
    hi = [draw(st.integers(a + 1, g)) for a, g in zip(lo, grid)]
    start = offset + Vec(*(a * c for a, c in zip(lo, chunk)))
    stop = Vec(*(min(o + b * c, o + s) for o, b, c, s in zip(offset, hi, chunk, size)))
    r0 = [draw(st.integers(0, s - 1)) for s in size]
    r1 = [draw(st.integers(a + 1, s)) for a, s in zip(r0, size)]
    read = Bbox(offset + Vec(*r0), offset + Vec(*r1))
    return (Bbox(offset, offset + size), chunk, draw(st.integers(1, 2)), draw(st.sampled_from(DTYPES)),
            Bbox(start, stop), read)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=layers(), compression=st.sampled_from(["none", "gzip"]), seed=st.integers(0, 2 ** 16))
def test_same_files_and_same_reads_as_cloudvolume(tmp_path_factory, layer, compression, seed):
    box, chunk, channels, dtype, aligned, read = layer
    root = tmp_path_factory.mktemp("layers")
    direct, reference = (create_volume(f"file://{root / name}", box, chunk, channels, dtype, compression=compression)
                         for name in ("direct", "reference"))
    _through_cloudvolume(reference)
    whole = _data((channels, *box.shape), dtype, seed)
    part = _data((channels, *aligned.shape), dtype, seed + 1)
    for vol in (direct, reference):
        vol.write(box, whole)
        vol.write(aligned, part)
    assert _tree(root / "direct") == _tree(root / "reference")
    expected = whole.copy()
    expected[(slice(None), *aligned.slices(box))] = part
    want = expected[(slice(None), *read.slices(box))]
    for missing in ("zeros", "count", "refuse"):
        again = open_volume(f"file://{root / 'direct'}", missing=missing)
        assert again._files is not None
        got = again.read(read)
        assert got.dtype == want.dtype and got.flags.c_contiguous and np.array_equal(got, want)
        assert again.filled_chunks == 0
    if read.size > 1 or channels == 1:  # CloudVolume 12 reads one voxel of several channels in the wrong shape
        assert np.array_equal(_through_cloudvolume(open_volume(f"file://{root / 'direct'}")).read(read), want)


def test_tensorstore_reads_what_the_direct_path_wrote(tmp_path):
    ts = pytest.importorskip("tensorstore")
    box, chunk = Bbox(Vec(3, -10, 20), Vec(23, 60, 65)), Vec(8, 32, 16)
    vol = create_volume(f"file://{tmp_path / 'pre'}", box, chunk, 2, "float32", compression="none")
    data = _data((2, *box.shape), "float32", 3)
    vol.write(box, data)
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path / 'pre'}/"}).result()
    xyzc = store[ts.d[:3].translate_to[0]].read().result()  # X,Y,Z,C from the voxel offset
    np.testing.assert_array_equal(np.asarray(xyzc).transpose(3, 2, 1, 0), data)


def _missing_layer(tmp_path: Path) -> tuple[str, np.ndarray, Path]:
    """A uint8 layer of 2x2x2 chunks of 4x8x8, the chunk at the origin never written."""
    url = f"file://{tmp_path / 'holes'}"
    box, chunk = Bbox(Vec(0, 0, 0), Vec(8, 16, 16)), Vec(4, 8, 8)
    vol = create_volume(url, box, chunk, 1, "uint8", compression="none")
    data = _data((1, 8, 16, 16), "uint8", 5)
    for z in (0, 4):
        for y in (0, 8):
            for x in (0, 8):
                if (z, y, x) != (0, 0, 0):
                    part = Bbox(Vec(z, y, x), Vec(z, y, x) + chunk)
                    vol.write(part, data[(slice(None), *part.slices(box))])
    data[:, :4, :8, :8] = 0
    return url, data, tmp_path / "holes" / "8.0_8.0_40.0"


def test_missing_chunks_read_counted_and_refused_as_through_cloudvolume(tmp_path):
    url, data, _ = _missing_layer(tmp_path)
    box = Bbox(Vec(0, 0, 0), Vec(8, 16, 16))
    for volumes in ((open_volume(url, missing=m), _through_cloudvolume(open_volume(url, missing=m)))
                    for m in ("zeros", "count")):
        for vol in volumes:
            np.testing.assert_array_equal(vol.read(box), data)
        assert volumes[0].filled_chunks == volumes[1].filled_chunks
    assert open_volume(url, missing="count").filled_chunks == 0
    counted = open_volume(url, missing="count")
    counted.read(box)
    assert counted.filled_chunks == 1
    errors = []
    for vol in (open_volume(url, missing="refuse"), _through_cloudvolume(open_volume(url, missing="refuse"))):
        with pytest.raises(MissingInput) as err:
            vol.read(Bbox(Vec(2, 2, 2), Vec(6, 10, 10)))
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "8.0_8.0_40.0/0-8_0-8_0-4" in errors[0] and "--fill-missing" in errors[0]
    np.testing.assert_array_equal(open_volume(url, missing="refuse").read(Bbox(Vec(4, 0, 0), Vec(8, 16, 16))),
                                  data[:, 4:])


def test_empty_chunk_file_reads_as_zeros_and_is_not_counted(tmp_path):
    url, data, scale = _missing_layer(tmp_path)
    (scale / "0-8_0-8_0-4").write_bytes(b"")
    box = Bbox(Vec(0, 0, 0), Vec(8, 16, 16))
    for vol in (open_volume(url, missing="count"), _through_cloudvolume(open_volume(url, missing="count"))):
        np.testing.assert_array_equal(vol.read(box), data)
        assert vol.filled_chunks == 0
    for vol in (open_volume(url, missing="refuse"), _through_cloudvolume(open_volume(url, missing="refuse"))):
        with pytest.raises(MissingInput, match="0-8_0-8_0-4"):
            vol.read(box)


def test_chunk_of_the_wrong_size_is_one_storage_error_line(tmp_path):
    url, _, scale = _missing_layer(tmp_path)
    (scale / "8-16_0-8_0-4").write_bytes(b"\0" * 100)
    with pytest.raises(StorageError) as err:
        open_volume(url).read(Bbox(Vec(0, 0, 0), Vec(8, 16, 16)))
    text = str(err.value)
    assert "\n" not in text and "8.0_8.0_40.0/8-16_0-8_0-4" in text and "100 bytes" in text and "256" in text


def test_chunk_under_another_suffix_is_read_through_cloudvolume(tmp_path):
    from cloudfiles import compression

    url, data, scale = _missing_layer(tmp_path)
    chunk = data[:, :4, :8, :8].copy()
    chunk[:] = 7
    (scale / "0-8_0-8_0-4.xz").write_bytes(compression.compress(chunk.tobytes(), "xz"))
    data[:, :4, :8, :8] = 7
    vol = open_volume(url, missing="refuse")
    np.testing.assert_array_equal(vol.read(Bbox(Vec(0, 0, 0), Vec(8, 16, 16))), data)


def test_gzip_chunks_are_read_and_a_new_layer_gets_its_scale_directory(tmp_path):
    box, chunk = Bbox(Vec(0, 0, 0), Vec(5, 9, 7)), Vec(2, 4, 4)
    url = f"file://{tmp_path / 'g'}"
    vol = create_volume(url, box, chunk, 1, "uint16", compression="gzip")
    assert not (tmp_path / "g" / "8.0_8.0_40.0").exists()
    data = _data((1, *box.shape), "uint16", 9)
    vol.write(box, data)
    names = os.listdir(tmp_path / "g" / "8.0_8.0_40.0")
    assert len(names) == 3 * 3 * 2 and all(n.endswith(".gz") for n in names)
    np.testing.assert_array_equal(open_volume(url, missing="refuse").read(box), data)


def test_a_rewritten_chunk_holds_exactly_the_new_bytes_shorter_or_longer(tmp_path):
    """Chunks are written over in place and cut to length (not truncated first): a gzip chunk that
    shrinks (noise, then zeros) or grows again holds CloudVolume's bytes and reads back exactly."""
    box, chunk = Bbox(Vec(0, 0, 0), Vec(4, 16, 16)), Vec(4, 8, 8)
    root = tmp_path / "layers"
    direct, reference = (create_volume(f"file://{root / name}", box, chunk, 1, "float32", compression="gzip")
                         for name in ("direct", "reference"))
    _through_cloudvolume(reference)
    noise, zeros = _data((1, *box.shape), "float32", 11), np.zeros((1, *box.shape), np.float32)
    sizes = []
    for data in (noise, zeros, noise, zeros):
        for vol in (direct, reference):
            vol.write(box, data)
        assert _tree(root / "direct") == _tree(root / "reference")
        sizes.append(sum(p.stat().st_size for p in (root / "direct").rglob("*.gz")))
        np.testing.assert_array_equal(open_volume(f"file://{root / 'direct'}", missing="refuse").read(box), data)
    assert sizes[0] > sizes[1] < sizes[2] > sizes[3]  # the chunks did shrink and grow
    mask = os.umask(0)
    os.umask(mask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in (root / "direct").rglob("*.gz"))


def test_a_chunk_file_is_read_to_its_end_even_when_it_is_longer_than_its_size_said():
    """``read_to_end`` reads the size fstat gives, then on until a read returns nothing: a pipe (size 0,
    short reads) stands for a file that grew or a read cut short; every byte comes back once."""
    import threading

    from chunkflow.storage.local_io import read_to_end

    payload = os.urandom((5 << 20) // 2)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, payload[:1000]), os.write(w, payload[1000:]), os.close(w)))
    writer.start()
    try:
        assert read_to_end(r) == payload
    finally:
        writer.join()
        os.close(r)


def test_a_json_file_half_rewritten_in_place_is_read_again_until_it_parses(tmp_path, monkeypatch):
    """CloudVolume's commit_info and zarr rewrite metadata in place: a worker's re-read can meet a torn
    file. It is read again while it does not parse; one that stays broken raises the parse error."""
    from chunkflow.storage import local_io

    path = tmp_path / "info"
    path.write_text('{"scales": [')  # a writer midway, which finishes while the reader pauses
    pauses = []
    monkeypatch.setattr(local_io.time, "sleep", lambda s: (pauses.append(s), path.write_text('{"scales": []}')))
    assert local_io.read_json_file(path) == {"scales": []} and pauses == [local_io.JSON_PAUSE_S]
    monkeypatch.setattr(local_io.time, "sleep", pauses.append)
    path.write_text("{not json")
    with pytest.raises(ValueError):
        local_io.read_json_file(path)
    assert len(pauses) == local_io.JSON_ATTEMPTS  # 1 + JSON_ATTEMPTS - 1
