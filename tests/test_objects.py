"""Object stores against a real directory and a real GCS API server (fake-gcs-server)."""
from __future__ import annotations

import socket
import threading
import uuid

import pytest

from chunkflow.storage import DirectoryStore, StorageError, open_store

KEY = "donations/0-64_0-64_0-16%0-8_0-64_0-16"


@pytest.fixture(params=["dir", "gcs"])
def store(request, tmp_path):
    if request.param == "dir":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("gcs_bucket")
    return open_store(f"gs://{bucket}/jobs/abc")


def test_put_get_exists_delete(store):
    assert not store.exists(KEY)
    with pytest.raises(KeyError):
        store.get(KEY)
    assert store.put(KEY, b"one") is True
    assert store.exists(KEY)
    assert store.get(KEY) == b"one"
    assert store.put(KEY, b"two") is True  # plain put overwrites
    assert store.get(KEY) == b"two"
    store.delete(KEY)
    store.delete(KEY)  # absent is fine
    assert not store.exists(KEY)


def test_delete_many_removes_every_name_present_or_not_and_nothing_else(store):
    names = [f"done/1/{i}-{i + 1}_0-1_0-1" for i in range(40)]
    for name in names + ["done/2/keep"]:
        store.put(name, b"")
    assert store.delete_many(names + ["done/1/absent"]) == 41  # in parallel; an absent name is fine
    assert list(store.list("done/")) == ["done/2/keep"]
    assert store.delete_many([]) == 0


def test_if_absent_is_enforced(store):
    assert store.put("marker/done", b"first", if_absent=True) is True
    assert store.put("marker/done", b"second", if_absent=True) is False
    assert store.get("marker/done") == b"first"
    # racing writers: exactly one wins
    results: list[bool] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        ok = store.put("marker/race", f"writer {i}".encode(), if_absent=True)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.get("marker/race").startswith(b"writer ")


def test_list_and_get_many(store):
    names = [f"d/{i:02d}%x" for i in range(12)] + ["e/one", "d2/z"]
    for i, name in enumerate(names):
        store.put(name, bytes(i + 1))
    assert sorted(store.list("d/")) == sorted(n for n in names if n.startswith("d/"))
    assert sorted(store.list("d")) == sorted(n for n in names if n.startswith("d"))
    assert sorted(store.list()) == sorted(names)
    assert list(store.list("nothing/")) == []
    sizes = dict(store.list_with_sizes("e/"))
    assert sizes == {"e/one": 13}
    wanted = names[:5] + ["d/missing"]
    got = store.get_many(wanted, workers=4)
    assert set(got) == set(wanted)
    assert got["d/missing"] is None
    for i, name in enumerate(names[:5]):
        assert got[name] == bytes(i + 1)


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/../b", "a\\b", "", "a/", "./a"])
def test_name_validation(store, bad):
    for call in (lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.exists(bad),
                 lambda: store.delete(bad), lambda: store.get_many([bad])):
        with pytest.raises(ValueError):
            call()


def test_directory_store_leaves_no_temp_files(tmp_path):
    store = DirectoryStore(tmp_path / "s")
    store.put("a/b", b"x" * 1000)
    store.put("a/b", b"y", if_absent=True)
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == ["b"]
    assert open_store(f"file://{tmp_path}/s").get("a/b") == b"x" * 1000


def test_missing_bucket_is_one_line(gcs_server):
    name = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError) as err:
        open_store(f"gs://{name}/prefix")
    msg = str(err.value)
    assert f"bucket {name} does not exist" in msg and "\n" not in msg


def test_refused_connection_is_one_line(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again once the block ends
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as err:
        open_store("gs://bucket/prefix", retry_deadline=0.5)
    msg = str(err.value)
    assert "connection refused" in msg and f"127.0.0.1:{port}" in msg and "\n" not in msg


def test_unsupported_store_url():
    with pytest.raises(StorageError):
        open_store("s3://bucket/x")


def test_a_store_url_with_two_slashes_suggests_three():
    with pytest.raises(StorageError) as err:
        open_store("file://tmp/x/job")
    assert str(err.value) == ("store URL 'file://tmp/x/job' must be file:///absolute/path (did you mean "
                              "file:///tmp/x/job?)")
