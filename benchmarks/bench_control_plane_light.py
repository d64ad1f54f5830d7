"""The control-plane commands of ``bench_control_plane.py`` over a *light* fabricated job of N blocks.

A light job has the names of :func:`bench_control_plane.fabricate`'s job (a manifest planned over an
empty volume; a done marker for every block but ``--pending`` of them; each marker's done-log entry,
in the minute folder of a fleet that finished ``--rate`` blocks per second until now; every donation
key of the first ``--donation-blocks`` blocks, 16 bytes each), but its markers and log entries are
empty files written without fsync, not :func:`chunkflow.stages.mark_done` records. A million blocks
take a few minutes and about 100 MB of disk (inodes and folders: an empty file has no data block),
instead of 18 minutes and 4 GiB. What differs for the commands: a marker has no body, so ``status``
has no finish times to sample (its ETA is null); nothing else they do reads a marker's body.

The commands are those of ``bench_control_plane.commands`` (default: all but ``produce --force``,
which would write N queue files), each in a fresh process with its wall time and peak RSS, run with
the chunkflow of ``--repo`` (default: this checkout; give a worktree of an older commit to measure
before a change)::

    python benchmarks/bench_control_plane_light.py --n 1e6 --root /tmp/cp-light
    git worktree add /tmp/cp-base BASE && \\
        python benchmarks/bench_control_plane_light.py --n 1e6 --root /tmp/cp-light --repo /tmp/cp-base
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import fire

import bench_control_plane as bench
from common import volume_url
import chunkflow
from chunkflow import Vec
# the light job's markers and done-log entries are written as empty files at the names the control
# plane reads (its block grid, the log's minute buckets): internals by design, not in the API
from chunkflow.block_set import BlockGrid
from chunkflow.done_log import bucket_of, log_name
from chunkflow.storage import create_volume  # an empty input volume (an info file): the API has no volume I/O

SKIPPED = ("produce --force (all N)",)


def fabricate_light(root: Path, n: int, pending: int = 10, donation_blocks: int = 0,
                    rate: float = 1.0) -> bench.Fabricated:
    """A light job of ``n`` blocks in ``root/job`` (see the module docstring); reused when ``root``
    holds one made with the same parameters."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "light.json"
    want = bench.Fabricated(str(root / "job"), int(n), bench.grid_for(n), int(pending), min(int(donation_blocks), n),
                            float(rate), fingerprint="light")
    if stamp.exists():
        old = bench.Fabricated(**{**json.loads(stamp.read_text()), "reused": True})
        if (old.blocks, tuple(old.grid), old.pending, old.donation_blocks, old.rate) == \
                (want.blocks, want.grid, want.pending, want.donation_blocks, want.rate):
            return old
        raise SystemExit(f"{root} holds a light job of other parameters ({stamp}); give another --root")
    started = time.perf_counter()
    layout = bench.layout_for(n)
    create_volume(volume_url(root / "input"), layout.bbox, Vec(bench.BLOCK), 1, "uint8")
    job = chunkflow.plan(volume_url(root / "input"), volume_url(root / "output"), want.store, "identity",
                         input_patch=",".join(map(str, bench.BLOCK)), overlap=",".join(map(str, bench.OVERLAP)),
                         block=",".join(map(str, bench.BLOCK)), device="cpu", fill_missing=True)
    want.markers = _markers(Path(want.store), BlockGrid(job.layout), bench.pending_blocks(n, pending), rate)
    want.seconds["done_markers"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    for i, block in enumerate(job.layout.block_indices()):
        if i >= want.donation_blocks:
            break
        for donation in job.layout.donations_to(block):
            _touch(Path(want.store) / "donations" / donation.key, b"\0" * 16)
            want.donations += 1
    want.seconds["donations"] = round(time.perf_counter() - started, 3)
    stamp.write_text(json.dumps(asdict(want)))
    return want


def _markers(store: Path, grid: BlockGrid, skip: set[int], rate: float) -> int:
    """Empty done markers and log entries of every block not in ``skip``, in raster order, finished
    ``rate`` per second until now (so the log's minute folders are those of a real fleet)."""
    count, end, made = grid.size - len(skip), time.time(), 0
    for i in range(grid.size):
        if i in skip:
            continue
        name = grid.name(i)
        _touch(store / "done" / "stage1" / name)
        _touch(store / log_name(1, name, bucket_of(end - (count - 1 - made) / rate)))
        made += 1
    return made


def _touch(path: Path, data: bytes = b"") -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def main(n: float = 1e6, root: str = "/tmp/cp-light", pending: int = 10, donation_blocks: float = 0,
         rate: float = 1.0, repo: str | None = None, limit: float = 600.0, max_rss_gib: float = 8.0,
         commands: str = "") -> None:
    """Fabricate (or reuse) a light job and time the commands on it.

    Args:
        n: blocks of the job.
        root: where the light job is made (and reused).
        pending: blocks without a done marker.
        donation_blocks: blocks whose donations are written (16-byte files).
        rate: blocks per second of the fabricated fleet (the done log's minute folders).
        repo: the chunkflow checkout the commands run with (default: this one).
        limit: seconds each command may run.
        max_rss_gib: a command past this RSS is killed and reported.
        commands: the labels to run, separated by ';' (default: all but produce --force).
    """
    if repo is not None:
        bench.ROOT = Path(repo).resolve()  # the children's PYTHONPATH (bench.child_env)
    started = time.perf_counter()
    fab = fabricate_light(Path(root), int(float(n)), int(pending), int(float(donation_blocks)), rate)
    print(f"N={fab.blocks:,}: {'reused' if fab.reused else 'made'} light job of grid {tuple(fab.grid)}: "
          f"{fab.markers:,} markers, {fab.donations:,} donations, {time.perf_counter() - started:.0f} s; "
          f"commands run with {bench.ROOT}", flush=True)
    only = tuple(c for c in commands.split(";") if c) if commands else \
        tuple(label for label, *_ in bench.commands(fab.store, Path(root)) if label not in SKIPPED)
    results = bench.time_commands(fab, Path(root), limit, max_rss_gib, only=only)
    print("\n".join(bench.command_table(results)[0]))
    print(f"1-minute load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    fire.Fire(main)
