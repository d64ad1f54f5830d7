"""OME-Zarr input and output, zarr output compression, and formats chunkflow refuses to read.

Images are written by the ``ome-zarr`` package where it can (its writer is the reference for
what the format looks like in the wild) and by hand where a case needs metadata it will not
write; chunkflow's output is read back by tensorstore, zarr-python and ``ome_zarr.reader``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import StorageError, create_volume, open_volume
from chunkflow.storage.volume_urls import volume_format
from chunkflow.storage.zarr_volume import ZARR_COMPRESSIONS, check_zarr_compression, zarr_compressions

ROOT = Path(__file__).resolve().parent.parent
AXES = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
LEVEL0 = np.random.default_rng(7).integers(0, 255, (2, 16, 64, 48), dtype=np.uint8)
LEVEL1 = np.ascontiguousarray(LEVEL0[:, :, ::2, ::2])
# level 0 at voxel (3, 10, 20) of 40x8x8 nm; level 1 (40x16x16 nm) at (3, 5, 10), the same place
TRANSFORMS = [
    [{"type": "scale", "scale": [1.0, 0.04, 0.008, 0.008]}, {"type": "translation", "translation": [0, 0.12, 0.08, 0.16]}],
    [{"type": "scale", "scale": [1.0, 0.04, 0.016, 0.016]}, {"type": "translation", "translation": [0, 0.12, 0.08, 0.16]}],
]


def _fmt(version: str):
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if version == "0.4" else FormatV05()


def ome_image(path: Path, version: str = "0.5", transforms=TRANSFORMS) -> str:
    """A two-level image with a non-zero translation, written by ome_zarr.writer.write_multiscale."""
    import zarr
    from ome_zarr.writer import write_multiscale

    fmt = _fmt(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # coordinate_transformations: the only way to translate
        write_multiscale([LEVEL0, LEVEL1], group, fmt=fmt, axes=AXES, coordinate_transformations=transforms,
                         storage_options={"chunks": (2, 8, 16, 16)})
    return str(path)


def hand_image(path: Path, arrays, axes, transforms, version="0.5", outer=None) -> str:
    """An image written with zarr-python and hand-made metadata (cases ome-zarr will not write)."""
    import zarr

    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for i, (data, ct) in enumerate(zip(arrays, transforms)):
        group.create_array(str(i), data=data, chunks=data.shape)
        datasets.append({"path": str(i), "coordinateTransformations": ct})
    ms = {"axes": axes, "datasets": datasets}
    if outer:
        ms["coordinateTransformations"] = outer
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        group.attrs["multiscales"] = [dict(ms, version="0.4")]
    return str(path)


def one_line_refusal(call, *args, **kwargs) -> str:
    with pytest.raises(StorageError) as err:
        call(*args, **kwargs)
    text = str(err.value)
    assert "\n" not in text
    return text


# -- OME-Zarr input ------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_image_levels(tmp_path, version):
    url = ome_image(tmp_path / "img.zarr", version)
    vol0 = open_volume(url)
    assert vol0.bbox == Bbox.from_shape(Vec(3, 10, 20), Vec(16, 64, 48))
    assert vol0.resolution == (40.0, 8.0, 8.0)
    assert vol0.num_channels == 2 and vol0.dtype == np.uint8 and vol0.chunk_size == Vec(8, 16, 16)
    np.testing.assert_array_equal(vol0.read(vol0.bbox), LEVEL0)
    vol1 = open_volume(url, mip=1)
    assert vol1.bbox == Bbox.from_shape(Vec(3, 5, 10), Vec(16, 32, 24))
    assert vol1.resolution == (40.0, 16.0, 16.0)
    np.testing.assert_array_equal(vol1.read(vol1.bbox), LEVEL1)
    sub = Bbox(Vec(4, 9, 12), Vec(10, 30, 30))
    np.testing.assert_array_equal(vol1.read(sub), LEVEL1[(slice(None), *sub.slices(vol1.bbox))])

    # one level given directly: placed by the parent's metadata, and only as itself
    paths = [d["path"] for d in _multiscales(url)["datasets"]]
    level = open_volume(f"{url}/{paths[1]}")
    assert level.bbox == vol1.bbox and level.resolution == vol1.resolution
    np.testing.assert_array_equal(level.read(level.bbox), LEVEL1)
    assert open_volume(f"zarr://{url}/{paths[1]}").bbox == vol1.bbox
    assert "open " + url + " with --mip 1" in one_line_refusal(open_volume, f"{url}/{paths[1]}", mip=1)


def _multiscales(url: str) -> dict:
    zarr_json = Path(url) / "zarr.json"
    if zarr_json.exists():
        return json.loads(zarr_json.read_text())["attributes"]["ome"]["multiscales"][0]
    return json.loads((Path(url) / ".zattrs").read_text())["multiscales"][0]


def test_missing_level_names_the_levels(tmp_path):
    url = ome_image(tmp_path / "img.zarr")
    text = one_line_refusal(open_volume, url, mip=2)
    assert text == f"--mip 2: {url} has no such level; its levels are 0 (40x8x8 nm), 1 (40x16x16 nm)"
    for bad in (-1, True, 1.0):
        assert "is not a resolution level" in one_line_refusal(open_volume, url, mip=bad)


def test_plain_array_keeps_working_and_has_one_level(tmp_path):
    import zarr

    path = str(tmp_path / "plain.zarr")
    arr = zarr.create_array(path, shape=(1, 8, 16, 16), chunks=(1, 8, 8, 8), dtype="float32",
                            attributes={"voxel_offset": [1, 2, 3], "resolution": [30, 6, 6]})
    arr[:] = 2.5
    vol = open_volume(path)
    assert vol.bbox == Bbox.from_shape(Vec(1, 2, 3), Vec(8, 16, 16)) and vol.resolution == (30.0, 6.0, 6.0)
    assert "plain zarr array, which has one level" in one_line_refusal(open_volume, path, mip=1)


def test_multiscale_transforms_units_and_axes(tmp_path):
    # dataset transforms in voxels, the multiscale's scale in micrometers, a leading t of size 1
    zyx = np.arange(4 * 8 * 8, dtype=np.float32).reshape(1, 4, 8, 8)
    axes = [{"name": "t", "type": "time", "unit": "second"}] + \
        [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    url = hand_image(tmp_path / "t.zarr", [zyx], axes,
                     [[{"type": "scale", "scale": [1, 1, 1, 1]}, {"type": "translation", "translation": [0, 2, 4, 6]}]],
                     outer=[{"type": "scale", "scale": [1, 0.03, 0.006, 0.006]}])
    vol = open_volume(url)
    assert vol.bbox == Bbox.from_shape(Vec(2, 4, 6), Vec(4, 8, 8)) and vol.resolution == (30.0, 6.0, 6.0)
    assert vol.num_channels == 1
    np.testing.assert_array_equal(vol.read(vol.bbox), zyx)

    # NGFF 0.4, zarr v2, axes t,c,z,y,x, angstrom
    tczyx = np.ones((1, 3, 4, 8, 8), np.uint16)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + \
        [{"name": n, "type": "space", "unit": "angstrom"} for n in "zyx"]
    url = hand_image(tmp_path / "v4.zarr", [tczyx], axes, [[{"type": "scale", "scale": [1, 1, 400, 80, 80]}]],
                     version="0.4")
    vol = open_volume(url)
    assert vol.num_channels == 3 and vol.resolution == (40.0, 8.0, 8.0) and vol.bbox.start == Vec(0, 0, 0)
    assert vol.read(vol.bbox).shape == (3, 4, 8, 8)


@pytest.mark.parametrize("names, shape, message", [
    ("yx", (8, 8), "has axes y,x"),
    ("xyz", (4, 8, 8), "has axes x,y,z"),
    ("zcyx", (4, 2, 8, 8), "has axes z,c,y,x"),
    ("tzyx", (2, 4, 8, 8), "2 time points"),
])
def test_other_axis_layouts_refused(tmp_path, names, shape, message):
    kinds = {"t": "time", "c": "channel"}
    axes = [{"name": n, "type": kinds.get(n, "space")} for n in names]
    url = hand_image(tmp_path / "a.zarr", [np.zeros(shape, np.uint8)], axes,
                     [[{"type": "scale", "scale": [1.0] * len(shape)}]])
    assert message in one_line_refusal(open_volume, url)


def test_bad_transforms_refused(tmp_path):
    data = [np.zeros((4, 8, 8), np.uint8)]
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    half = [[{"type": "scale", "scale": [40, 8, 8]}, {"type": "translation", "translation": [0, 4, 0]}]]
    text = one_line_refusal(open_volume, hand_image(tmp_path / "h.zarr", data, axes, half))
    assert "translation 4 nanometer on the y axis is 0.5 of its voxels, not a whole number" in text
    furlong = [dict(a, unit="furlong") for a in axes]
    text = one_line_refusal(open_volume, hand_image(tmp_path / "u.zarr", data, furlong, [[{"type": "scale", "scale": [1, 1, 1]}]]))
    assert "'furlong' is not a length unit" in text
    short = [[{"type": "scale", "scale": [1, 1]}]]
    assert "is not 3 numbers" in one_line_refusal(open_volume, hand_image(tmp_path / "s.zarr", data, axes, short))


def test_pixel_centre_pyramid_level_is_refused_not_rounded(tmp_path):
    """ome-zarr's write_image puts level 1 half a level-0 voxel off (pixel centres): level 0 reads,
    level 1 is refused with the reason, since an integer offset would misplace the output."""
    from ome_zarr.writer import write_image

    url = str(tmp_path / "pyr.zarr")
    write_image(LEVEL0, url, scale_factors=[2], axes="czyx", scale={"c": 1.0, "z": 40.0, "y": 8.0, "x": 8.0},
                axes_units={"z": "nanometer", "y": "nanometer", "x": "nanometer"})
    vol = open_volume(url)
    assert vol.bbox == Bbox.from_shape(Vec(0, 0, 0), Vec(16, 64, 48)) and vol.resolution == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(vol.read(vol.bbox), LEVEL0)
    text = one_line_refusal(open_volume, url, mip=1)
    assert "not a whole number" in text and "pixel-centre pyramid" in text


def test_groups_that_are_not_images_refused(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").attrs["bioformats2raw.layout"] = 3
    assert "give one image, e.g." in one_line_refusal(open_volume, str(tmp_path / "g.zarr"))
    zarr.open_group(str(tmp_path / "e.zarr"), mode="w")
    assert "not an OME-Zarr image" in one_line_refusal(open_volume, str(tmp_path / "e.zarr"))


# -- zarr output as OME-Zarr ---------------------------------------------------------------------
BOX = Bbox(Vec(3, 10, 20), Vec(23, 80, 65))
CHUNK = Vec(8, 32, 16)


def _output(tmp_path, compression="none", channels=2, seed=0):
    url = str(tmp_path / "out.zarr")
    vol = create_volume(url, BOX, CHUNK, channels, "float32", resolution=(40.0, 4.0, 4.0), compression=compression)
    data = np.random.default_rng(seed).random((channels, *BOX.shape), dtype=np.float32)
    vol.write(BOX, data)
    return url, vol, data


def test_output_is_an_ome_zarr_image_others_read(tmp_path):
    import tensorstore as ts
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    url, vol, data = _output(tmp_path)
    scale, translation = [1.0, 40.0, 4.0, 4.0], [0.0, 120.0, 40.0, 80.0]

    # zarr-python: the group's NGFF 0.5 metadata, and the array the writes went to
    group = zarr.open_group(url, mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert [a.get("unit") for a in ms["axes"]] == [None, "nanometer", "nanometer", "nanometer"]
    assert ms["datasets"][0]["path"] == "0"
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": scale},
                                                                {"type": "translation", "translation": translation}]
    array = group["0"]
    assert array.metadata.dimension_names == ("c", "z", "y", "x") and array.shape == (2, 20, 70, 45)
    np.testing.assert_array_equal(array[:], data)

    # tensorstore, zarr3 driver
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/0"}}).result()
    assert store.domain.labels == ("c", "z", "y", "x") and store.shape == (2, 20, 70, 45)
    np.testing.assert_array_equal(store.read().result(), data)

    # ome-zarr's reader
    node = list(Reader(parse_url(url))())[0]
    assert [tuple(d.shape) for d in node.data] == [(2, 20, 70, 45)]
    assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": scale},
                                                          {"type": "translation", "translation": translation}]]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data)

    # chunkflow again: same geometry, and create_volume returns it (or refuses another layout)
    for again in (open_volume(url), open_volume(f"{url}/0"),
                  create_volume(url, BOX, CHUNK, 2, "float32", resolution=(40.0, 4.0, 4.0))):
        assert again.geometry() == vol.geometry()
        np.testing.assert_array_equal(again.read(BOX), data)
    with pytest.raises(StorageError, match="different geometry.*resolution"):
        create_volume(url, BOX, CHUNK, 2, "float32", resolution=(40.0, 8.0, 8.0))


def test_output_with_odd_resolution_reopens_identically(tmp_path):
    url = str(tmp_path / "odd.zarr")
    resolution = (100 / 3, 4.1, 0.7)
    vol = create_volume(url, BOX, CHUNK, 1, "float32", resolution=resolution)
    assert create_volume(url, BOX, CHUNK, 1, "float32", resolution=resolution).geometry() == vol.geometry()


def test_metadata_and_chunkflow_attributes_must_agree(tmp_path):
    import zarr

    url, _, _ = _output(tmp_path)
    group = zarr.open_group(url, mode="r+")
    ome = group.attrs["ome"]
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][1]["translation"][1] = 160.0
    group.attrs["ome"] = ome
    assert "make them agree" in one_line_refusal(open_volume, url)


def test_half_created_output_opens(tmp_path):
    """A creator that has made array 0 but not yet the group metadata: a second creator opens it."""
    import zarr

    url, vol, data = _output(tmp_path)
    group = zarr.open_group(url, mode="r+")
    del group.attrs["ome"]
    again = create_volume(url, BOX, CHUNK, 2, "float32", resolution=(40.0, 4.0, 4.0))
    np.testing.assert_array_equal(again.read(BOX), data)


def test_output_on_gcs_and_its_level_path(gcs_bucket):
    url = f"zarr://gs://{gcs_bucket}/ome-out.zarr"
    vol = create_volume(url, BOX, CHUNK, 2, "float32", resolution=(40.0, 4.0, 4.0), compression="blosc")
    data = np.random.default_rng(4).random((2, *BOX.shape), dtype=np.float32)
    vol.write(BOX, data)
    for again in (open_volume(url), open_volume(f"{url}/0")):
        assert again.geometry() == vol.geometry()
        np.testing.assert_array_equal(again.read(BOX), data)
    assert "has no such level" in one_line_refusal(open_volume, url, mip=1)


# -- output compression --------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ZARR_COMPRESSIONS)
def test_compression_round_trips_and_is_in_the_metadata(tmp_path, compression):
    url, vol, data = _output(tmp_path, compression)
    np.testing.assert_array_equal(open_volume(url).read(BOX), data)
    codecs = [c["name"] for c in json.loads((Path(url) / "0" / "zarr.json").read_text())["codecs"]]
    expected = {"none": [], "default": ["zstd"]}.get(compression, [compression])
    assert codecs == ["bytes"] + expected


def test_unknown_compression_refused_and_nothing_created(tmp_path):
    url = str(tmp_path / "c.zarr")
    text = one_line_refusal(create_volume, url, BOX, CHUNK, 1, "float32", compression="lz4")
    assert text == "output compression 'lz4' is not available for zarr volumes; valid: default, none, zstd, blosc, gzip"
    assert not os.path.exists(url)
    for bad in ("ZSTD", None, 3):
        assert "valid: default, none, zstd, blosc, gzip" in one_line_refusal(check_zarr_compression, bad, "float32", 1)
    check_zarr_compression("gzip", "uint8", 3)
    assert zarr_compressions("float16") == ZARR_COMPRESSIONS


# -- formats chunkflow does not read -------------------------------------------------------------
def _tiff_stack(folder: Path, data: np.ndarray) -> None:
    tifffile = pytest.importorskip("tifffile")
    folder.mkdir()
    for z, plane in enumerate(data):
        tifffile.imwrite(str(folder / f"z{z:04d}.tif"), plane)


@pytest.mark.parametrize("name, fmt", [
    ("em.h5", "HDF5"), ("em.hdf5", "HDF5"), ("em.HDF", "HDF5"), ("em.h5/volumes/raw", "HDF5"),
    ("em.n5", "N5"), ("em.n5/raw/s0", "N5"), ("em.tif", "TIFF"), ("em.tiff", "TIFF"),
])
def test_foreign_formats_refused_by_name(tmp_path, name, fmt):
    path = tmp_path / name
    for url in (str(path), f"file://{path}", f"zarr://{path}", f"gs://bucket/{name}"):
        for call in (lambda u: open_volume(u), lambda u: create_volume(u, BOX, CHUNK, 1, "float32")):
            text = one_line_refusal(call, url)
            assert text.startswith(f"{fmt} input ") and "is not read by chunkflow; convert it to zarr first" in text
    assert not (tmp_path / name.split("/")[0]).exists()
    if name == "em.h5/volumes/raw":
        assert "['volumes/raw']" in one_line_refusal(open_volume, str(path))


def test_foreign_formats_refused_by_content(tmp_path):
    n5 = tmp_path / "container"
    n5.mkdir()
    (n5 / "attributes.json").write_text(json.dumps({"n5": "4.0.0"}))
    assert one_line_refusal(open_volume, f"file://{n5}").startswith(f"N5 input {n5} ")
    _tiff_stack(tmp_path / "stack", np.zeros((2, 4, 4), np.uint8))
    for url in (str(tmp_path / "stack"), f"file://{tmp_path / 'stack'}"):
        assert one_line_refusal(open_volume, url).startswith(f"TIFF input {tmp_path / 'stack'} ")
    assert volume_format(f"{tmp_path}/img.zarr/0") == "zarr"


def _run_commands(message: str, env: dict | None = None) -> None:
    """Run the python3 -c commands a refusal names, as a user would paste them."""
    commands = re.findall(r'python3 -c "[^"]*"', message)
    assert len(commands) == 2, message
    for command in commands:
        argv = shlex.split(command)
        argv[0] = sys.executable
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow  # runs the refusal's python3 -c commands in subprocesses
def test_tiff_conversion_command_works(tmp_path):
    pytest.importorskip("dask")
    data = np.random.default_rng(1).integers(0, 255, (5, 24, 40), dtype=np.uint8)
    _tiff_stack(tmp_path / "stack", data)
    _run_commands(one_line_refusal(open_volume, str(tmp_path / "stack")))
    vol = open_volume(str(tmp_path / "stack.zarr"))
    assert vol.resolution == (40.0, 8.0, 8.0) and vol.bbox == Bbox.from_shape(Vec(0, 0, 0), Vec(5, 24, 40))
    np.testing.assert_array_equal(vol.read(vol.bbox)[0], data)


@pytest.mark.slow  # runs the refusal's python3 -c commands in subprocesses
def test_n5_conversion_command_works(tmp_path):
    ts = pytest.importorskip("tensorstore")
    data = np.random.default_rng(2).integers(0, 255, (6, 20, 30), dtype=np.uint8)
    n5 = tmp_path / "em.n5"
    # as Java's N5 writes a Z,Y,X stack: dimensions listed x first
    ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(n5 / "raw")}}, create=True,
            dtype=ts.uint8, shape=data.shape[::-1]).result().write(data.transpose(2, 1, 0)).result()
    (n5 / "attributes.json").write_text(json.dumps({"n5": "4.0.0"}))
    _run_commands(one_line_refusal(open_volume, f"{n5}/raw"))
    np.testing.assert_array_equal(open_volume(str(tmp_path / "em.zarr")).read(Bbox.from_shape((0, 0, 0), data.shape))[0],
                                  data)


@pytest.mark.slow  # runs the refusal's python3 -c commands in subprocesses
def test_hdf5_conversion_command_works_against_a_stand_in(tmp_path):
    """h5py is no dependency: a stand-in module with h5py.File's reading API (a mapping of datasets
    that numpy can slice) checks the rest of the command: the dask copy into zarr."""
    pytest.importorskip("dask")
    data = np.random.default_rng(3).random((4, 12, 20), dtype=np.float32)
    np.save(tmp_path / "em.h5.npy", data)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "h5py.py").write_text(
        "import numpy as np\n"
        "class File(dict):\n"
        "    def __init__(self, path, mode='r'):\n"
        "        super().__init__({'volumes/raw': np.load(path + '.npy', mmap_mode='r')})\n")
    message = one_line_refusal(open_volume, str(tmp_path / "em.h5" / "volumes" / "raw"))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    _run_commands(message, env)
    np.testing.assert_array_equal(open_volume(str(tmp_path / "em.zarr")).read(Bbox.from_shape((0, 0, 0), data.shape))[0],
                                  data)


def test_docs_show_the_commands():
    from chunkflow.storage.formats import CONVERT, SET_RESOLUTION

    doc = (ROOT / "docs" / "formats_zarr.md").read_text()
    assert CONVERT["HDF5"].format(src="em.h5", dataset="volumes/raw", dst="em.zarr") in doc
    assert CONVERT["N5"].format(src="em.n5/raw", dst="em.zarr") in doc
    assert CONVERT["TIFF"].format(src="stack/*.tif", dst="em.zarr") in doc
    assert SET_RESOLUTION.format(dst="em.zarr") in doc
    for value in ZARR_COMPRESSIONS:
        assert f"`{value}`" in doc


# -- end to end ----------------------------------------------------------------------------------
def test_run_at_mip_1_of_an_ome_zarr_input_matches_reference(tmp_path):
    from chunkflow.cli import main

    url = ome_image(tmp_path / "img.zarr")
    flags = ["--input", url, "--model", "identity", "--input-patch", "8,16,16", "--overlap", "2,4,4",
             "--mip", "1", "--quiet"]
    main(["run", *flags, "--output", str(tmp_path / "run.zarr"), "--block", "8,16,16",
          "--output-compression", "zstd"])
    main(["reference", *flags, "--output", str(tmp_path / "ref.zarr")])
    run, ref = open_volume(str(tmp_path / "run.zarr")), open_volume(str(tmp_path / "ref.zarr"))
    expected = Bbox.from_shape(Vec(3, 5, 10), Vec(16, 32, 24))
    assert run.bbox == ref.bbox == expected and run.resolution == ref.resolution == (40.0, 16.0, 16.0)
    out = run.read(expected)
    np.testing.assert_allclose(out, ref.read(expected), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, LEVEL1 / 255.0, rtol=0, atol=1e-5)  # identity model: the scaled input
    # the output lies where the input's level 1 lies (0.12, 0.08, 0.16 micrometers), stored as asked
    meta = _multiscales(str(tmp_path / "run.zarr"))["datasets"][0]["coordinateTransformations"]
    assert meta[1]["translation"] == [0.0, 120.0, 80.0, 160.0]
    codecs = json.loads((tmp_path / "run.zarr" / "0" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "zstd"]
