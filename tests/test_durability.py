"""A done marker is written only after its block's data is on disk (chunkflow.storage.durability).

The group commit's ordering is checked with a slow flush in threads; the order of the real system
calls of a whole run (every chunk and donation a block wrote closed, then a ``syncfs``, then its
marker published) is read from ``strace`` of a real ``chunkflow run``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from chunkflow.bbox import Bbox
from chunkflow.errors import StorageError
from chunkflow.resources import Resources
from chunkflow.storage.durability import Durability, local_volume_directory
from tests.test_engines_support import PY, ROOT, assert_complete_and_exact, run_flags, small_job


def test_one_directory_per_filesystem_is_flushed_and_a_missing_path_stands_for_its_parent(tmp_path):
    (tmp_path / "a").mkdir()
    durable = Durability([str(tmp_path / "a"), str(tmp_path), str(tmp_path / "not" / "yet")])
    assert durable.directories == [str(tmp_path / "a")]  # one filesystem: one syncfs
    durable.settle()  # the real syncfs
    assert durable.flushes == 1
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        assert Durability([str(tmp_path), "/dev/shm"]).directories == [str(tmp_path), "/dev/shm"]
    assert Durability([]).directories == []


def test_local_volume_directory_names_local_volumes_only(tmp_path):
    assert local_volume_directory(f"file://{tmp_path}/out") == str(tmp_path / "out")
    assert local_volume_directory(str(tmp_path / "v.zarr")) == str(tmp_path / "v.zarr")
    assert local_volume_directory("gs://bucket/out") is None
    assert local_volume_directory("zarr://gs://bucket/v.zarr") is None


def test_resources_flush_the_output_and_the_store_of_a_local_job(tmp_path):
    job = small_job(tmp_path)
    durable = Resources(job).durable
    assert durable.paths == [str(tmp_path / "out"), str((tmp_path / "job").resolve())]
    assert durable.directories == [str(tmp_path / "out")]  # one filesystem: one syncfs


def test_every_settle_waits_for_a_flush_that_started_after_it_and_callers_share_flushes(tmp_path):
    flushes: list[tuple[float, float]] = []

    def slow_flush(fd, where):
        start = time.perf_counter()
        time.sleep(0.02)
        flushes.append((start, time.perf_counter()))

    durable = Durability([str(tmp_path)], flush=slow_flush)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller():
        for _ in range(5):
            asked = time.perf_counter()
            durable.settle()
            with lock:
                calls.append((asked, time.perf_counter()))
            time.sleep(0.003)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 40
    for asked, returned in calls:
        assert any(asked <= start and end <= returned for start, end in flushes), (asked, returned)
    assert durable.flushes == len(flushes) < len(calls)  # shared: 8 threads asking at once


def test_a_failed_flush_fails_every_later_settle_of_the_worker(tmp_path):
    """The kernel reports a writeback error once per open file: a second flush could return 0 over the
    lost data, so neither the callers waiting on the failed flush nor later ones may go on."""
    attempts = []
    started, release = threading.Event(), threading.Event()

    def failing_flush(fd, where):
        attempts.append(where)
        started.set()
        release.wait(5)
        raise StorageError(f"cannot make the writes under {where} durable: Input/output error (errno EIO)")

    durable = Durability([str(tmp_path)], flush=failing_flush)
    errors: list[str] = []

    def settle():
        try:
            durable.settle()
        except StorageError as err:
            errors.append(str(err))

    first = threading.Thread(target=settle)
    first.start()
    started.wait(5)
    waiting = [threading.Thread(target=settle) for _ in range(3)]  # they wait on the flush that fails
    for t in waiting:
        t.start()
    time.sleep(0.05)
    release.set()
    for t in [first, *waiting]:
        t.join(5)
    with pytest.raises(StorageError, match="an earlier flush failed: restart this worker"):
        durable.settle()
    assert len(errors) == 4 and all("Input/output error" in e for e in errors)
    assert attempts == [str(tmp_path)]  # never flushed again: that flush could not see the error


def test_a_remote_job_has_nothing_to_flush():
    durable = Durability([], flush=lambda fd, where: pytest.fail("flushed a remote job"))
    durable.settle()
    assert durable.flushes == 0


def test_an_interrupt_during_a_flush_leaves_the_next_settle_free_to_flush(tmp_path):
    calls = []

    def interrupted_once(fd, where):
        calls.append(where)
        if len(calls) == 1:
            raise KeyboardInterrupt

    durable = Durability([str(tmp_path)], flush=interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        durable.settle()
    done = threading.Thread(target=durable.settle)
    done.start()
    done.join(5)
    assert not done.is_alive() and len(calls) == 2


# -- the system calls of a real run ----------------------------------------------------------------------

_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_DURATION = re.compile(r"<(\d+\.\d+)>$")


def _syscalls(trace: Path) -> list[dict]:
    """(name, start, end, args, result) of every traced call, unfinished/resumed pairs joined."""
    calls, pending = [], {}
    for line in trace.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, start, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            name = rest.split("(", 1)[0]
            pending[(pid, name)] = (start, rest[len(name) + 1:-len("<unfinished ...>")])
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            name = resumed.group(1)
            if (pid, name) not in pending:
                continue
            start, args = pending.pop((pid, name))
            rest = name + "(" + args + resumed.group(2)
        name = rest.split("(", 1)[0]
        duration = _DURATION.search(rest)
        result = re.search(r"\)\s+=\s+(-?\d+)", rest)
        calls.append({"name": name, "start": start, "end": start + float(duration.group(1)) if duration else start,
                      "args": rest, "result": int(result.group(1)) if result else None})
    return calls


def _owner(path: str, job) -> tuple[int, str] | None:
    """(stage, block name) whose task writes the file ``path``: an output chunk (stage one in a
    block's core, stage two in its band) or a donation's temp file (its donor's stage one)."""
    layout, name = job.layout, os.path.basename(path)
    if "/donations/" in path and name.startswith(".cftmp-"):
        key = name[len(".cftmp-"):].rsplit(".", 2)[0]
        donor = {d.key: d.donor for b in layout.block_indices() for d in layout.donations_to(b)}[key]
        return 1, layout.block_box(donor).name
    if "/out/" in path and re.fullmatch(r"\d+-\d+_\d+-\d+_\d+-\d+", name):
        chunk = Bbox.from_name(name)
        for block in layout.block_indices():
            if layout.block_box(block).contains(chunk):
                return (1 if layout.core_box(block).contains(chunk) else 2), layout.block_box(block).name
    return None


@pytest.mark.slow  # a traced subprocess
def test_a_done_marker_is_published_only_after_a_syncfs_that_began_after_its_blocks_writes(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    job = small_job(tmp_path)
    trace = tmp_path / "trace.txt"
    result = subprocess.run(["strace", "-f", "-y", "-ttt", "-T", "-s", "400", "-o", str(trace), "-e",
                             "trace=openat,close,rename,renameat,renameat2,syncfs,fsync",
                             PY, "-m", "chunkflow.cli", "run", *run_flags(job), "--quiet"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if result.returncode != 0 and "ptrace" in result.stderr.lower():
        pytest.skip(f"strace cannot trace here: {result.stderr.strip().splitlines()[0]}")
    assert result.returncode == 0, result.stderr
    assert_complete_and_exact(job)

    calls = sorted(_syscalls(trace), key=lambda c: c["end"])
    flushed_dirs = {str(tmp_path / "out"), str((tmp_path / "job").resolve())}
    open_for_write: set[tuple[int, str]] = set()  # strace -y names each descriptor's file
    written: dict[tuple[int, str], float] = {}  # (stage, block) -> when its last data file was closed
    syncs = [(c["start"], c["end"]) for c in calls if c["name"] == "syncfs" and c["result"] == 0
             and re.match(r"syncfs\(\d+<([^>]+)>", c["args"]).group(1) in flushed_dirs]
    markers = []
    for c in calls:
        if c["name"] == "openat" and c["result"] is not None and c["result"] >= 0 \
                and re.search(r"O_WRONLY|O_RDWR", c["args"]):
            open_for_write.add((c["result"], re.search(r'"([^"]+)"', c["args"]).group(1)))
        elif c["name"] == "close" and (m := re.match(r"close\((\d+)<([^>]+)>\s*\)", c["args"])) \
                and (int(m.group(1)), m.group(2)) in open_for_write:
            open_for_write.discard((int(m.group(1)), m.group(2)))
            owner = _owner(m.group(2), job)
            if owner is not None:
                written[owner] = max(written.get(owner, 0.0), c["end"])
        elif c["name"].startswith("rename") and (m := re.search(r'"[^"]*/done/stage(\d)/([^"/]+)"\D*$',
                                                                 c["args"].split(") =")[0])):
            markers.append((int(m.group(1)), m.group(2), c["start"]))
    assert not [path for _, path in open_for_write if _owner(path, job)], "a data file's close was not read"
    blocks = {job.layout.block_box(b).name for b in job.layout.block_indices()}
    assert {(stage, name) for stage, name, _ in markers} == {(s, n) for s in (1, 2) for n in blocks}
    # every block donated in stage one; every block with a band wrote it in stage two
    assert {(1, name) for name in blocks} <= set(written)
    assert {(2, job.layout.block_box(b).name) for b in job.layout.block_indices() if job.layout.band_boxes(b)} \
        <= set(written)
    for stage, name, published in markers:
        last_write = written.get((stage, name))
        if last_write is None:
            continue  # this stage of this block had nothing to write (no band)
        assert last_write < published, (stage, name)
        assert any(last_write <= start and end <= published for start, end in syncs), \
            f"stage {stage} marker of {name}: no syncfs between its last write and its marker"
    # and each marker is durable itself (put(durable=True)): its directory fsynced after its rename
    for stage, name, published in markers:
        folder = str((tmp_path / "job").resolve() / "done" / f"stage{stage}")
        assert any(c["name"] == "fsync" and c["start"] >= published and f"<{folder}>" in c["args"] for c in calls), \
            (stage, name)
