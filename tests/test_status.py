"""``chunkflow status`` on a job of thousands of blocks: counts from the checkpoint and the done log
(and from the markers alone on a store written before the log existed), an ETA sampled from the
done bitmap, and a table whose columns stay apart at seven-digit counts."""
from __future__ import annotations

import json
import time
from pathlib import Path

import fire
import pytest

from chunkflow.block_set import BlockGrid
from chunkflow.cli import COMMANDS
from chunkflow.done_log import announce
from chunkflow.store_layout import MANIFEST
from chunkflow.status import SAMPLE, format_status, job_status
from chunkflow.storage import DirectoryStore
from tests.test_done_log import grid_job


def _report(total: int, done: int, running: int, failed: int) -> dict:
    stage = {"total": total, "done": done, "running": running, "failed": failed, "eta_s": 7200.0,
             "oldest_running_s": None, "failed_blocks": [], "stale": 0, "stale_blocks": [], "gave_up_blocks": [],
             "failures": []}
    return {"job": "0123456789abcdef", "store": "file:///data/job", "blocks": total,
            "stages": {"1": {**stage, "name": "inference-and-donate"},
                       "2": {**stage, "name": "receive-and-blend", "done": 0, "running": 0, "failed": 0}}}


@pytest.mark.parametrize("counts", [(10485761, 1048576, 1048575, 1000000), (8, 0, 1, 1), (123, 45, 6, 7)])
def test_status_columns_are_sized_to_the_numbers(counts):
    lines = format_status(_report(*counts))
    header = lines[1]
    first, second = (next(line for line in lines if name in line) for name in ("inference-", "receive-"))
    assert first.split() == ["inference-and-donate", *map(str, counts), "2.0", "h"]
    assert second.split() == ["receive-and-blend", str(counts[0]), "0", "0", "0", "2.0", "h"]
    for line in (first, second):  # every number ends where its column title ends, two spaces or more apart
        for title in ("total", "done", "running", "failed"):
            end = header.index(title) + len(title)
            assert line[end - 1] != " " and line[end:end + 2] == "  ", (title, line)


def test_status_table_of_a_small_job_is_unchanged():
    lines = format_status(_report(8, 0, 1, 1))
    assert lines[1] == "  stage                   total   done  running  failed  ETA"
    assert lines[2] == "  inference-and-donate        8      0        1       1  2.0 h"


def _manifest(store: DirectoryStore, job) -> None:
    store.put(MANIFEST, job.to_json().encode())


def _markers(root: Path, grid: BlockGrid, blocks, record: dict | None = None, log: bool = True) -> None:
    """Done markers written straight into the directory store (no fsync: thousands of them)."""
    folder = root / "done" / "stage1"
    folder.mkdir(parents=True, exist_ok=True)
    bucket = root / "log" / "stage1" / f"{int(time.time() // 60):010d}"
    bucket.mkdir(parents=True, exist_ok=True)
    for i in blocks:
        name = grid.name(i)
        (folder / name).write_text(json.dumps(record or {}))
        if log:
            (bucket / name).write_bytes(b"")


def _status(capsys, root: Path, *flags: str) -> str:
    fire.Fire(COMMANDS, ["status", str(root), *flags])
    return capsys.readouterr().out


def test_status_reads_the_markers_once_then_only_the_log(tmp_path, capsys):
    root = tmp_path / "job"
    store, job = DirectoryStore(root), grid_job(str(root), shape=(4, 32, 32))
    _manifest(store, job)
    grid = BlockGrid(job.layout)
    _markers(root, grid, range(0, 1500), log=False)  # finished before the log existed
    store.put(f"running/stage1/{grid.name(2000)}", json.dumps({"started": time.time() - 30, "attempt": 1}).encode())
    store.put(f"failed/stage1/{grid.name(2001)}", json.dumps({"error": "boom", "attempt": 1}).encode())
    report = json.loads(_status(capsys, root, "--json"))["stages"]["1"]
    assert (report["total"], report["done"], report["running"], report["failed"]) == (4096, 1500, 1, 1)
    assert store.exists("summary/stage1")
    _markers(root, grid, range(1500, 2001))  # then through the log, the running block among them
    out = _status(capsys, root)
    assert "inference-and-donate     4096   2001        0       1" in out, out
    assert f"failed: {grid.name(2001)}: attempt 1 failed: boom" in out


def test_status_counts_a_block_done_whose_worker_died_before_its_log_entry(tmp_path, capsys):
    root = tmp_path / "job"
    store, job = DirectoryStore(root), grid_job(str(root))
    _manifest(store, job)
    job_status(job)  # a checkpoint: from now on status reads the log
    grid = BlockGrid(job.layout)
    name = grid.name(7)
    store.put(f"running/stage1/{name}", json.dumps({"started": time.time() - 30, "attempt": 1}).encode())
    store.put(f"done/stage1/{name}", b"{}")  # killed here, before announce() and before the running marker went
    report = json.loads(_status(capsys, root, "--json"))["stages"]["1"]
    assert (report["done"], report["running"]) == (1, 0)
    announce(store, 1, grid.name(8))  # a log entry without a done marker is not a done block either way...
    store.put(f"done/stage1/{grid.name(8)}", b"{}")  # ...it is once the marker exists
    assert job_status(job)["stages"]["1"]["done"] == 2


def test_eta_samples_the_done_bitmap_of_a_big_job(tmp_path):
    """1000 of 4096 blocks finished one a second up to now: the sample of 256 measures that rate."""
    root = tmp_path / "job"
    job = grid_job(str(root), shape=(4, 32, 32))
    grid = BlockGrid(job.layout)
    now = time.time()
    for i in range(1000):
        _markers(root, grid, [i * 4], {"finished": now - i, "seconds": {"model": 1.0}})
    report = job_status(job, now=now)["stages"]["1"]
    assert report["done"] == 1000 and SAMPLE < 1000
    assert report["eta_s"] == pytest.approx(3096, rel=0.05)  # 3096 blocks left at about one a second


# The ETA shows a time only while the stage progresses: not with nothing running (unless a block
# finished within G = clamp(2 x mean interval, ETA_GRACE_MIN_S, ETA_GRACE_MAX_S) of now: a queue
# worker between two tasks), and not when every block left is failed.

def _eta_job(tmp_path, shape=(1, 1, 8)):
    root = tmp_path / "job"
    store, job = DirectoryStore(root), grid_job(str(root), shape=shape)
    _manifest(store, job)
    return root, store, job, BlockGrid(job.layout)


def _one_worker(root: Path, grid: BlockGrid, blocks, last: float, seconds: float = 10.0) -> None:
    """``blocks`` finished one after the other by one worker, ``seconds`` each, the last at ``last``."""
    for k, i in enumerate(reversed(list(blocks))):
        _markers(root, grid, [i], {"finished": last - k * seconds, "seconds": {"model": seconds}})


def _run(store: DirectoryStore, grid: BlockGrid, i: int, started: float) -> None:
    store.put(f"running/stage1/{grid.name(i)}", json.dumps({"started": started, "attempt": 1}).encode())


def _fail(store: DirectoryStore, grid: BlockGrid, i: int) -> None:
    store.put(f"failed/stage1/{grid.name(i)}", json.dumps({"error": "boom", "attempt": 1}).encode())


def test_eta_with_nothing_running_shows_why_not_a_time(tmp_path, capsys):
    """The finding: one block done a minute ago, no worker running: not `23 s`, then `72 s`."""
    root, store, job, grid = _eta_job(tmp_path)
    now = time.time()
    _one_worker(root, grid, [0], last=now - 60)  # a 10 s task: G = 20 s, so 60 s ago is no longer "between tasks"
    report = json.loads(_status(capsys, root, "--json"))["stages"]["1"]
    assert (report["done"], report["running"], report["eta_s"], report["eta_reason"]) == (1, 0, None, "none running")
    assert "inference-and-donate        8      1        0       0  - (none running)" in _status(capsys, root)
    stage2 = job_status(job, now=now)["stages"]["2"]  # nothing done, nothing running
    assert (stage2["eta_s"], stage2["eta_reason"]) == (None, "none running")


def test_eta_with_a_block_running_is_a_time_over_the_blocks_neither_done_nor_failed(tmp_path, capsys):
    root, store, job, grid = _eta_job(tmp_path)
    now = time.time()
    _one_worker(root, grid, [0, 1], last=now - 2400)  # 2 blocks in 20 s, 40 min ago (before ETA_WINDOW_S)
    _run(store, grid, 2, now - 5)
    _fail(store, grid, 3)
    report = job_status(job, now=now)["stages"]["1"]
    assert (report["done"], report["running"], report["failed"]) == (2, 1, 1)
    assert report["eta_reason"] is None
    assert report["eta_s"] == pytest.approx(5 * 10.0)  # 8 - 2 done - 1 failed = 5 blocks at 10 s each
    assert "inference-and-donate        8      2        1       1  50 s" in _status(capsys, root)


def test_eta_when_every_block_left_is_failed_names_them(tmp_path, capsys):
    """The finding's stage two: 7 blocks failed, none running, and an ETA of `37 s`."""
    root, store, job, grid = _eta_job(tmp_path)
    now = time.time()
    _one_worker(root, grid, [0], last=now - 1)  # even a block that finished a second ago does not make it a time
    for i in range(1, 8):
        _fail(store, grid, i)
    report = json.loads(_status(capsys, root, "--json"))["stages"]["1"]
    assert (report["done"], report["failed"], report["eta_s"], report["eta_reason"]) == (1, 7, None, "7 failed")
    assert "inference-and-donate        8      1        0       7  - (7 failed)" in _status(capsys, root)
    store.delete(f"failed/stage1/{grid.name(7)}")  # one block left that may still run: a time again
    report = job_status(job, now=now)["stages"]["1"]
    assert (report["eta_s"], report["eta_reason"]) == (pytest.approx(11.0), None)  # 1 block per 11 s since it started


@pytest.mark.parametrize("ago, shown", [(5.0, True), (30.0, True), (45.0, False), (400.0, False)])
def test_eta_with_nothing_running_just_after_a_completion_is_still_a_time(tmp_path, ago, shown):
    """A worker between two tasks has nothing running for a moment. One worker at 20 s a block:
    mean interval 20 s, so G = 40 s (more than ETA_GRACE_MIN_S = 10 s)."""
    root, store, job, grid = _eta_job(tmp_path)
    now = time.time()
    _one_worker(root, grid, range(4), last=now - ago, seconds=20.0)
    report = job_status(job, now=now)["stages"]["1"]
    assert report["running"] == 0
    if shown:
        assert report["eta_reason"] is None and report["eta_s"] > 0
    else:
        assert (report["eta_s"], report["eta_reason"]) == (None, "none running")


def test_eta_grace_is_at_least_the_floor_and_at_most_the_cap(tmp_path):
    root, store, job, grid = _eta_job(tmp_path)
    now = time.time()
    _one_worker(root, grid, range(4), last=now - 8, seconds=0.5)  # 2 x 0.5 s is below the 10 s floor
    assert job_status(job, now=now)["stages"]["1"]["eta_reason"] is None
    assert job_status(job, now=now + 5)["stages"]["1"]["eta_reason"] == "none running"  # 13 s after it
    root, store, job, grid = _eta_job(tmp_path / "long")
    _one_worker(root, grid, range(4), last=now - 400, seconds=3600.0)  # 2 h tasks: G is capped at 300 s
    assert job_status(job, now=now)["stages"]["1"]["eta_reason"] == "none running"
    assert job_status(job, now=now - 150)["stages"]["1"]["eta_reason"] is None


def test_eta_with_nothing_running_finds_the_last_completion_in_the_log_when_the_sample_misses_it(tmp_path,
                                                                                                  monkeypatch):
    """A big job's ETA sample seldom holds the newest done marker: the done log of the last G
    seconds finds it."""
    import chunkflow.status as status

    root, store, job, grid = _eta_job(tmp_path, shape=(4, 32, 32))
    now = time.time()
    for i in range(1000):  # a day ago, one a second (entries only in old, unlisted log buckets)
        _markers(root, grid, [i], {"finished": now - 86400 - i, "seconds": {"model": 1.0}}, log=False)
    _markers(root, grid, [1000], {"finished": now - 1, "seconds": {"model": 1.0}})  # and one a second ago
    sample = status._sample
    monkeypatch.setattr(status, "_sample", lambda done, n: [b for b in sample(done, n) if b != grid.name(1000)])
    report = job_status(job, now=now)["stages"]["1"]
    assert (report["done"], report["running"], report["eta_reason"]) == (1001, 0, None)
    assert report["eta_s"] > 0
    assert job_status(job, now=now + 60)["stages"]["1"]["eta_reason"] == "none running"


def test_eta_column_texts():
    report = _report(8, 1, 0, 7)
    first, second = report["stages"]["1"], report["stages"]["2"]
    first.update(eta_s=None, eta_reason="7 failed", failed_blocks=["b"] * 7)
    second.update(eta_s=None, eta_reason="none running")
    lines = format_status(report)
    assert lines[2].endswith("7  - (7 failed)") and lines[-1].endswith("0  - (none running)")
    first.update(eta_reason="not measured")
    second.update(done=8)
    lines = format_status(report)
    assert lines[2].endswith("7  ?") and lines[-1].endswith("0  done")
