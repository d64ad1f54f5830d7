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
