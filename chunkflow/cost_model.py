"""What a job costs: object operations, bytes stored at the peak, worker-hours and dollars.

Pure: numbers in, numbers out. The dry run (:mod:`chunkflow.dryrun`) counts a job's tasks,
objects and bytes from the layout's per-axis sums and hands them here as :class:`JobCounts`;
:func:`estimate` turns them into :class:`Operations` and a :class:`CostEstimate` at given
:class:`Prices`.

The counts are of a normal run: every task succeeds on its first attempt, nothing is done yet,
no mask. Per task (both stages, :func:`chunkflow.engines.task.run_task`):

* reads: 3 marker checks (its done marker, then its ``running/`` and ``failed/`` markers for
  the attempt number), plus stage one's input chunks and stage two's donations;
* writes: 3 markers (``running/``, ``done/`` and the empty ``log/stage{n}/...`` entry beside the
  done marker), plus stage one's core chunks and donations and stage two's band chunks;
* deletes: 2 markers (``failed/``, absent in a normal run, and ``running/``), plus each
  donation once stage two has used it when it runs with ``--cleanup``;
* lists: none.

Per job, as each stage starts: its done checkpoint read and written, its done markers listed
(one request per 1,000 found). A queue fleet's barrier lists twice a poll (the done log since the
last poll, one more request per 1,000 new entries; the failed markers), writes the checkpoint once
a minute, and lists every stage-one done marker once before it produces stage two.

Queue workers also rewrite their task's running marker at every lease renewal (every
``lease / 3`` seconds): :attr:`Operations.heartbeats`, estimated from the worker-hours, is kept
out of the totals.

A read is one object: one input chunk of an unsharded input (a sharded input reads byte ranges
of its shards, and their indexes, instead). Every request is counted as charged: a check that
finds no marker is answered 404, which GCS's pricing page says is generally not charged, so the
marker reads of a first run are an upper bound.

The storage peak is the output plus every donation at once: in barrier order all of stage one
has donated before stage two starts. Streaming order with ``--cleanup`` deletes a block's
donations as soon as its stage two is done, so fewer are ever stored at once.

Prices (:data:`DEFAULT_PRICES`) are public list prices in US dollars as of 2025: Google Cloud
Storage, Standard class, region us-central1 (cloud.google.com/storage/pricing): Class A
operations (writes, lists) $0.005 per 1,000, Class B (reads) $0.0004 per 1,000, deletes free,
storage $0.020 per GB-month (GB = 2^30 bytes); Compute Engine on demand in us-central1
(cloud.google.com/compute/gpus-pricing, /vm-instance-pricing): an NVIDIA T4 $0.35 an hour on an
n1-standard-4 $0.19 an hour (a GPU worker, $0.54), and an n1-standard-4 alone for a stage-two
worker. Prices change; give your own.

Hours: stage one's are the calibrated model time (patches x seconds per patch), a lower bound,
for reads, writes and blending around the model add to it; stage two's are its donated bytes at
``stage_two_mb_s`` per worker, a rate measured on a local disk (docs/benchmarks.md section 6: 10.5
ns per float32 output voxel that donates 0.78 bytes per output byte, about 300 MB/s).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

from chunkflow.errors import UsageError

R = TypeVar("R")

#: when the default prices were public list prices
PRICES_AS_OF = "2025"
#: bytes in the GB of storage prices (cloud providers bill binary gigabytes)
GB = 2 ** 30
#: voxels in a teravoxel
TERAVOXEL = 10 ** 12

#: object requests of one task of either stage besides its data, in a normal run (module docstring)
MARKER_READS_PER_TASK = 4   # done/ (exists), running/ and failed/ (attempt number), output_claim.json (before writes)
MARKER_WRITES_PER_TASK = 3  # running/, done/, log/stage{n}/ (empty)
MARKER_DELETES_PER_TASK = 2  # failed/, running/
#: requests of the job as a whole, one of each per stage as it starts: its done checkpoint (``summary/stage{n}``)
#: read and written, and its done markers listed (one request per 1,000 found: one for a fresh job)
JOB_WRITES = STAGE_LISTS = 2
#: reads of the job as a whole: per stage, its checkpoint and done generation and, before any block is skipped
#: as done, the job's output claim and reset flag (``output_claim.json``, ``reset.json``); the same two again
#: when a worker process opens the output (once per worker process; counted once here); and the done
#: generation once more where stage two checks that stage one is complete
JOB_READS = 2 * 4 + 2 + 1
#: seconds between two refreshes of a queue worker's running marker: ``DEFAULT_LEASE / 3``
HEARTBEAT_SECONDS = 40.0
#: seconds between two polls of ``chunkflow barrier`` (its ``--poll`` default), the lists of a poll that finds
#: no new block, and the seconds between two writes of its checkpoint (``engines.queue.SAVE_EVERY_S``)
BARRIER_POLL_SECONDS = 5.0
BARRIER_LISTS_PER_POLL = 2
BARRIER_SAVE_SECONDS = 60.0


@dataclass(frozen=True)
class Prices:
    """Prices in US dollars, and the model's two assumptions.

    Attributes:
        gpu_hour: one stage-one worker-hour (the GPU and the machine it is attached to).
        cpu_hour: one stage-two worker-hour (a CPU machine).
        class_a: 1,000 Class A operations (object writes, lists).
        class_b: 1,000 Class B operations (object reads, metadata reads).
        gb_month: one GB (2^30 bytes) stored for a month.
        storage_months: months the peak is assumed stored (the job's duration).
        stage_two_mb_s: donations one stage-two worker receives and blends per second, in MB (10^6 bytes).
    """

    gpu_hour: float = 0.54
    cpu_hour: float = 0.19
    class_a: float = 0.005
    class_b: float = 0.0004
    gb_month: float = 0.020
    storage_months: float = 1.0
    stage_two_mb_s: float = 300.0


DEFAULT_PRICES = Prices()

#: each field of :class:`Prices`: its command-line parameter, what it is, and its help (with the default's source)
PRICE_FLAGS: dict[str, tuple[str, str, str]] = {
    "gpu_hour": ("price_gpu_hour", "US dollars per stage-one (GPU) worker-hour",
                 "default 0.54: NVIDIA T4 $0.35 + n1-standard-4 $0.19, GCP us-central1 on-demand list prices "
                 "as of 2025"),
    "cpu_hour": ("price_cpu_hour", "US dollars per stage-two (CPU) worker-hour",
                 "default 0.19: n1-standard-4, GCP us-central1 on-demand list price as of 2025"),
    "class_a": ("price_class_a", "US dollars per 1,000 object writes and lists",
                "default 0.005: GCS Standard Class A, us-central1, list price as of 2025"),
    "class_b": ("price_class_b", "US dollars per 1,000 object reads",
                "default 0.0004: GCS Standard Class B, us-central1, list price as of 2025"),
    "gb_month": ("price_gb_month", "US dollars per GB (2^30 bytes) stored for a month",
                 "default 0.020: GCS Standard, us-central1, list price as of 2025"),
    "storage_months": ("storage_months", "months the storage peak (output + donations) is held",
                       "default 1"),
    "stage_two_mb_s": ("stage_two_mb_s", "MB/s of donations one stage-two worker receives and blends",
                       "default 300, measured on 2 cores with a local disk, docs/benchmarks.md section 6"),
}

#: the command-line parameters that :func:`takes_prices` gives a command
PRICE_PARAMETERS = tuple(flag for flag, _, _ in PRICE_FLAGS.values())


def check_prices(**given: Any) -> Prices:
    """The :class:`Prices` of command-line values, refusing a bad one.

    Args:
        **given: values by command-line parameter name (``price_gpu_hour=0.5``, ...); a parameter
            left out keeps its default.

    Returns:
        The prices.

    Raises:
        UsageError: a value that is not a finite number >= 0 (> 0 for ``stage_two_mb_s``), or a
            name that is not a price parameter; one line naming the flag, the value and what is valid.
    """
    by_flag = {flag: name for name, (flag, _, _) in PRICE_FLAGS.items()}
    values = {}
    for flag, value in given.items():
        if flag not in by_flag:
            raise UsageError(f"{flag} is not a price; the prices are {', '.join(sorted(by_flag))}")
        name = by_flag[flag]
        positive = name == "stage_two_mb_s"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            value > 0 if positive else value >= 0)
        if not ok:
            raise UsageError(f"--{flag.replace('_', '-')} {value!r}: give a number {'> 0' if positive else '>= 0'}, "
                             f"{PRICE_FLAGS[name][1]} (e.g. {getattr(DEFAULT_PRICES, name)})")
        values[name] = float(value)
    return Prices(**values)


def takes_prices(fn: Callable[..., R]) -> Callable[..., R]:
    """Turn ``fn(..., prices: Prices = DEFAULT_PRICES, ...)`` into ``fn(..., price_gpu_hour=..., ...)``: one
    parameter per field of :class:`Prices` (:data:`PRICE_FLAGS`) in place of ``prices``, each documented in
    the docstring's ``Args`` and checked by :func:`check_prices` before ``fn`` runs.

    Args:
        fn: a function with a ``prices`` parameter and a docstring with an ``Args:`` section.

    Returns:
        The wrapper, with the derived signature (what Fire turns into flags) and docstring.
    """
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("prices")
    flags = [inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(DEFAULT_PRICES, name),
                               annotation="float") for name, (flag, _, _) in PRICE_FLAGS.items()]
    derived = signature.replace(parameters=params[:at] + flags + params[at + 1:])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        given = derived.bind(*args, **kwargs)
        given.apply_defaults()
        values = dict(given.arguments)
        prices = check_prices(**{p.name: values.pop(p.name) for p in flags})
        return fn(**values, prices=prices)

    lines = [line for line in inspect.cleandoc(fn.__doc__ or "").splitlines() if not line.startswith("    prices: ")]
    if "Args:" not in lines:
        lines += ["", "Args:"]
    end = lines.index("Args:") + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    docs = [f"    {flag}: dry run: {what} ({default})." for flag, what, default in PRICE_FLAGS.values()]
    wrapper.__doc__ = "\n".join(lines[:end] + docs + lines[end:]) + "\n"
    wrapper.__signature__ = derived  # type: ignore[attr-defined]
    return wrapper


@dataclass(frozen=True)
class JobCounts:
    """What the cost model needs to know about a job (the dry run counts it).

    Attributes:
        stage_one_tasks: stage-one tasks (blocks that own patches).
        stage_two_tasks: stage-two tasks (every block).
        input_reads: input storage chunks read, summed over stage-one tasks (a chunk two tasks read counts twice).
        output_objects: output objects written (storage chunks, or shards of a sharded output), each once.
        core_objects: of those, the ones stage one writes (its cores); stage two writes the rest (the bands).
        donations: donation objects (each written once by stage one and read once by stage two).
        output_bytes: bytes of the output, uncompressed.
        donated_bytes: bytes of every donation, uncompressed, with their headers.
        output_voxels: voxels of the output region.
        model_seconds: patches computed x the calibration's seconds per patch (None: not calibrated).
    """

    stage_one_tasks: int
    stage_two_tasks: int
    input_reads: int
    output_objects: int
    core_objects: int
    donations: int
    output_bytes: int
    donated_bytes: int
    output_voxels: int
    model_seconds: float | None = None


@dataclass(frozen=True)
class Operations:
    """Object requests of a job in a normal run (see the module docstring), and the bytes stored at the peak."""

    writes_output: int
    writes_donations: int
    writes_markers: int
    reads_input: int
    reads_donations: int
    reads_markers: int
    lists: int
    deletes_markers: int
    deletes_donations: int
    stored_output: int
    stored_donations: int
    heartbeats: int | None

    @property
    def peak_bytes(self) -> int:
        """The output and every donation, stored at once."""
        return self.stored_output + self.stored_donations

    @property
    def writes(self) -> int:
        return self.writes_output + self.writes_donations + self.writes_markers

    @property
    def reads(self) -> int:
        return self.reads_input + self.reads_donations + self.reads_markers

    @property
    def deletes(self) -> int:
        return self.deletes_markers + self.deletes_donations


def operations(c: JobCounts, stage_two_seconds: float | None = None) -> Operations:
    """The object requests and storage peak of job ``c``.

    Args:
        c: the job's counts.
        stage_two_seconds: the stage-two worker-seconds, for the queue workers' heartbeats (with ``c.model_seconds``).

    Returns:
        The operations; ``heartbeats`` is None without a calibration.
    """
    tasks = c.stage_one_tasks + c.stage_two_tasks
    busy = None if c.model_seconds is None else c.model_seconds + (stage_two_seconds or 0.0)
    return Operations(
        writes_output=c.output_objects, writes_donations=c.donations,
        writes_markers=MARKER_WRITES_PER_TASK * tasks + JOB_WRITES,
        reads_input=c.input_reads, reads_donations=c.donations, reads_markers=MARKER_READS_PER_TASK * tasks + JOB_READS,
        lists=STAGE_LISTS, deletes_markers=MARKER_DELETES_PER_TASK * tasks, deletes_donations=c.donations,
        stored_output=c.output_bytes, stored_donations=c.donated_bytes,
        heartbeats=None if busy is None else int(busy // HEARTBEAT_SECONDS))


@dataclass(frozen=True)
class CostEstimate:
    """A job's operations, worker-hours and dollars at ``prices`` (dollar fields in US dollars)."""

    ops: Operations
    prices: Prices
    gpu_hours: float | None
    cpu_hours: float
    class_a: float
    class_b: float
    storage: float
    gpu: float | None
    cpu: float
    total: float
    per_teravoxel: float
    counts: JobCounts

    def as_dict(self) -> dict:
        """Every number, for JSON: ``counts``, ``operations`` (with totals), ``hours``, ``dollars``, ``prices``."""
        ops = asdict(self.ops)
        ops.update(writes=self.ops.writes, reads=self.ops.reads, deletes=self.ops.deletes,
                   peak_bytes=self.ops.peak_bytes)
        return {"counts": asdict(self.counts), "operations": ops,
                "hours": {"gpu": self.gpu_hours, "cpu": self.cpu_hours},
                "dollars": {"class_a": self.class_a, "class_b": self.class_b, "storage": self.storage,
                            "gpu": self.gpu, "cpu": self.cpu, "total": self.total,
                            "per_teravoxel": self.per_teravoxel},
                "prices": asdict(self.prices), "prices_as_of": PRICES_AS_OF}


def estimate(c: JobCounts, prices: Prices = DEFAULT_PRICES) -> CostEstimate:
    """Operations, hours and dollars of job ``c`` at ``prices``.

    Class A is every write and list, Class B every read; deletes are free. Storage is the peak
    for ``prices.storage_months``. GPU hours are the calibrated model time (the model alone: I/O
    and blending around it add to it); CPU hours are the donated bytes at ``prices.stage_two_mb_s``.
    Without a calibration the GPU part is None and left out of the total.

    Args:
        c: the job's counts.
        prices: the prices and assumptions.

    Returns:
        The estimate.
    """
    cpu_hours = c.donated_bytes / (prices.stage_two_mb_s * 1e6) / 3600
    ops = operations(c, cpu_hours * 3600)
    gpu_hours = None if c.model_seconds is None else c.model_seconds / 3600
    class_a = (ops.writes + ops.lists) / 1000 * prices.class_a
    class_b = ops.reads / 1000 * prices.class_b
    storage = ops.peak_bytes / GB * prices.gb_month * prices.storage_months
    gpu = None if gpu_hours is None else gpu_hours * prices.gpu_hour
    cpu = cpu_hours * prices.cpu_hour
    total = class_a + class_b + storage + (gpu or 0.0) + cpu
    per_tv = total / (c.output_voxels / TERAVOXEL) if c.output_voxels else 0.0
    return CostEstimate(ops, prices, gpu_hours, cpu_hours, class_a, class_b, storage, gpu, cpu, total, per_tv, c)


def barrier_cost_per_hour(prices: Prices = DEFAULT_PRICES, poll: float = BARRIER_POLL_SECONDS) -> float:
    """US dollars an hour of a fleet's waiting barrier costs while no block finishes (each block that
    finishes adds a list request per 1,000): its lists and checkpoint writes, all Class A.

    Args:
        prices: the prices.
        poll: seconds between two polls.
    """
    requests = 3600 / poll * BARRIER_LISTS_PER_POLL + 3600 / BARRIER_SAVE_SECONDS
    return requests / 1000 * prices.class_a


def dollars(x: float) -> str:
    """``$1,234.57``; below a cent, two significant digits (``$0.000086``)."""
    return f"${x:,.2f}" if x >= 0.01 or x <= 0 else f"${x:.{1 - math.floor(math.log10(x))}f}"


def cost_lines(e: CostEstimate, human_bytes: Callable[[float], str] = lambda n: f"{n:,.0f} bytes") -> list[str]:
    """The dry run's lines about operations, storage, hours and dollars.

    Args:
        e: the estimate.
        human_bytes: how to print a number of bytes.

    Returns:
        Report lines, indented like the dry run's.
    """
    o, p = e.ops, e.prices
    confirm = -(-e.counts.stage_one_tasks // 1000)
    if e.gpu_hours is None:
        gpu, gpu_cost = "stage one not estimated (no calibration)", "GPU not estimated"
    else:
        gpu, gpu_cost = (f"stage one {e.gpu_hours:,.2f} (the calibrated model time; the I/O around it adds)",
                         f"GPU {dollars(e.gpu)}")
    beats = "" if not o.heartbeats else (f"; queue workers also refresh their running marker every "
                                             f"{HEARTBEAT_SECONDS:.0f} s, ~{o.heartbeats:,} writes not counted above")
    return [
        f"  object writes: {o.writes:,} = {o.writes_output:,} output objects + {o.writes_donations:,} donations + "
        f"{o.writes_markers:,} markers ({MARKER_WRITES_PER_TASK} per task: running, done, log; {JOB_WRITES} per job)",
        f"  object reads: {o.reads:,} = {o.reads_input:,} input chunks + {o.reads_donations:,} donations + "
        f"{o.reads_markers:,} marker checks ({MARKER_READS_PER_TASK} per task, {JOB_READS} per job)",
        f"  lists: none per task, {o.lists} per job, {confirm:,} more where a fleet's barrier confirms stage one; "
        f"the waiting barrier is {BARRIER_LISTS_PER_POLL} a poll, proportional to new markers beyond that "
        f"({dollars(barrier_cost_per_hour(p))} an hour at a poll every {BARRIER_POLL_SECONDS:g} s); deletes (free): "
        f"{o.deletes_markers:,} markers, and {o.deletes_donations:,} donations with --cleanup",
        f"  storage at the peak: {human_bytes(o.peak_bytes)} = output {human_bytes(o.stored_output)} + donations "
        f"{human_bytes(o.stored_donations)}, uncompressed (every donation at once, as in barrier order; streaming "
        f"order with --cleanup holds fewer)",
        f"  worker-hours: {gpu}, stage two {e.cpu_hours:,.2f} (at {p.stage_two_mb_s:g} MB/s of donations per "
        f"worker){beats}",
        f"  cost in US dollars (defaults: list prices as of {PRICES_AS_OF}; see --price-* flags): "
        f"{dollars(e.total)} = Class A {dollars(e.class_a)} + Class B {dollars(e.class_b)} + storage "
        f"{dollars(e.storage)} ({p.storage_months:g} month{'s' if p.storage_months != 1 else ''} of the peak) + "
        f"{gpu_cost} + CPU {dollars(e.cpu)}; {dollars(e.per_teravoxel)} per teravoxel"
        + ("" if e.gpu is not None else " (without the GPU)"),
    ]
