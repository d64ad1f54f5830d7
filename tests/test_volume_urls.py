"""``chunkflow.storage.volume_urls``: which format a volume URL names and where its bytes live, from the
URL alone (nothing opened). Opening volumes of each format is in ``tests/test_volumes.py`` and
``tests/test_ome_zarr.py``; the refusal of foreign formats in ``tests/test_foreign_inputs.py``."""
from __future__ import annotations

import os

import pytest

from chunkflow.errors import StorageError
from chunkflow.storage.volume_urls import (SUPPORTED_URLS, classify, same_or_nested, volume_format,
                                           volume_location)


@pytest.mark.parametrize("url, expected", [
    ("file:///data/em", ("precomputed", "file:///data/em")),
    ("gs://bucket/em", ("precomputed", "gs://bucket/em")),
    ("s3://bucket/em", ("precomputed", "s3://bucket/em")),
    ("precomputed://file:///data/em", ("precomputed", "file:///data/em")),
    ("precomputed://gs://bucket/em", ("precomputed", "gs://bucket/em")),
    ("precomputed://s3://bucket/em", ("precomputed", "s3://bucket/em")),
    ("/data/em.zarr", ("zarr", "/data/em.zarr")),
    ("relative/em.zarr", ("zarr", "relative/em.zarr")),
    ("/data/image.zarr/0", ("zarr", "/data/image.zarr/0")),   # one level of an OME-Zarr image
    ("/data/em.zarr/", ("zarr", "/data/em.zarr/")),
    ("zarr:///data/em", ("zarr", "/data/em")),
    ("zarr://file:///data/em.zarr", ("zarr", "/data/em.zarr")),
    ("zarr://gs://bucket/em.zarr", ("zarr", "gs://bucket/em.zarr")),
])
def test_supported_urls_give_their_format_and_location(url, expected):
    assert classify(url) == expected
    assert volume_format(url) == expected[0]


@pytest.mark.parametrize("url", [
    "", None, 7,
    "/data/em",                     # a local path that names no format
    "file://relative/em",           # file:// needs an absolute path
    "http://host/em", "https://host/em.zarr",
    "precomputed:///data/em", "precomputed://http://host/em",
    "zarr://", "zarr://s3://bucket/em.zarr", "zarr://https://host/em.zarr",
    "n5://data/em",
])
def test_unsupported_urls_are_refused_listing_what_is_supported(url):
    with pytest.raises(StorageError) as err:
        classify(url)
    message = str(err.value)
    assert repr(url) in message and message.endswith(SUPPORTED_URLS) and "\n" not in message


@pytest.mark.parametrize("url, meant", [
    ("/tmp/x/input", "file:///tmp/x/input"),                 # a plain absolute path
    ("file://tmp/x/input", "file:///tmp/x/input"),           # two slashes: 'tmp' became the host
    ("file://localhost/tmp/x", "file:///tmp/x"),
    ("precomputed:///data/em", "precomputed://file:///data/em"),
    ("precomputed://file://data/em", "precomputed://file:///data/em"),
])
def test_an_obvious_slip_is_refused_with_the_url_it_meant(url, meant):
    with pytest.raises(StorageError) as err:
        classify(url)
    assert str(err.value) == f"unsupported volume URL {url!r} (did you mean {meant}?); {SUPPORTED_URLS}"
    assert classify(meant)[0] == "precomputed"  # the suggestion itself is accepted


@pytest.mark.parametrize("url", ["data/em", "file://em"])  # file://em: a relative path with the scheme (a new user)
def test_a_relative_path_is_suggested_as_the_absolute_url_it_resolves_to(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as err:
        classify(url)
    assert f"(did you mean file://{tmp_path}/{url.rpartition('/')[2] if url.startswith('file') else url}?)" \
        in str(err.value)


@pytest.mark.parametrize("url", ["http://host/em", "zarr://s3://bucket/em.zarr", "gs:/bucket/em", "file://",
                                 "file://localhost"])
def test_no_suggestion_without_an_obvious_fix(url):
    with pytest.raises(StorageError) as err:
        classify(url)
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("url, fmt", [("/data/em.h5", "HDF5"), ("file:///data/em.n5", "N5"),
                                      ("/data/stack.tif", "TIFF")])
def test_a_foreign_format_is_refused_by_name_before_anything_else(url, fmt):
    with pytest.raises(StorageError, match=fmt):
        classify(url)


def test_local_locations_are_absolute_with_links_resolved(tmp_path, monkeypatch):
    real = tmp_path / "real.zarr"
    real.mkdir()
    os.symlink(real, tmp_path / "link.zarr")
    monkeypatch.chdir(tmp_path)
    where = os.path.realpath(real)
    for url in (str(real), f"{real}/", "link.zarr", "./real.zarr", f"zarr://{real}", f"zarr://file://{real}"):
        assert volume_location(url) == where, url
    assert volume_location(f"file://{real}") == where
    assert volume_location(f"precomputed://file://{tmp_path}/link.zarr") == where


def test_remote_locations_drop_the_format_prefix_and_trailing_slash():
    assert volume_location("gs://bucket/em/") == volume_location("precomputed://gs://bucket/em") == "gs://bucket/em"
    assert volume_location("zarr://gs://bucket/em.zarr/") == "gs://bucket/em.zarr"


@pytest.mark.parametrize("a, b, expected", [
    ("/d/em", "/d/em", True),
    ("/d/em", "/d/em/out", True),
    ("/d/em/out", "/d/em", True),
    ("/d/em", "/d/em2", False),                 # a shared name prefix is not nesting
    ("/d/em.zarr", "/d/em.zarr.out", False),
    ("gs://b/em", "gs://b/em/0", True),
    ("gs://b/em", "gs://c/em", False),
    ("/d/a", "/d/b", False),
])
def test_same_or_nested(a, b, expected):
    assert same_or_nested(a, b) is expected
    assert same_or_nested(b, a) is expected
