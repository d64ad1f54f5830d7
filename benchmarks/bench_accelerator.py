"""How busy the two stages keep a fast accelerator, and where the rest of the time goes.

The model is :class:`sim_accelerator.SimulatedAccelerator`: a device thread that holds itself
``--rate`` ns per patch voxel and returns the identity, so the host is free while it "computes"
(as with a CUDA launch) and the output must equal the ``identity`` model's whole-volume reference.
Each repeat runs stage one over every block (``inference_and_donate_many``, the worker path) and
then stage two over every block (``receive_and_blend``), on a store emptied of ``done/`` and
``donations/`` first. It reports:

- the accelerator's busy fraction in stage one (device seconds / stage-one wall);
- stage one's phases (read, model, blend, normalise, write, donate: they may overlap one another
  once stage one is pipelined, so the wall is given beside them);
- stage two's throughput (band voxels written per second, MB/s of donations received), its phases
  (fetch, verify, blend, write) and its blend bandwidth (float32 bytes of pieces summed per second)
  as a fraction of numpy's ``a += b`` at memory speed (:func:`memory_add_bandwidth`: float32 arrays
  of the job's pieces' sizes, each added once, from memory, not from a cache), measured in the same
  repeat; and, for comparison with earlier records, as a fraction of ``a += b`` repeated on one
  pair of arrays of the mean piece's size (:func:`add_bandwidth`), which stay in the cache;
- ns per output voxel through both stages;
- exactness, on the first repeat: the output against the identity reference, bit for bit, or the
  max difference.

``--rate 0`` (or ``--identity``) runs the plain ``identity`` backend instead. ``--baseline DIR``
runs the same measurement with the chunkflow of another checkout (``DIR``, e.g. an untouched copy
from before a change) interleaved with this one, each in its own process, and prints the ratio
current / baseline per repeat pair (median, min-max)::

    python benchmarks/bench_accelerator.py --rate 30
    python benchmarks/bench_accelerator.py --rate 30 --baseline /tmp/baseline
    python benchmarks/bench_accelerator.py --shape 32,192,192 --block 16,96,96 --repeat 2   # smoke
"""
from __future__ import annotations

import os
import sys

if os.environ.get("CHUNKFLOW_BENCH_ROOT"):  # a measurement process for --baseline: bind chunkflow to that checkout
    sys.path.insert(0, os.environ["CHUNKFLOW_BENCH_ROOT"])
    __import__("chunkflow")  # its submodules now load from that checkout, whatever sys.path says later

import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "@@result "
TOLERANCE = 1e-5  # the bands' float32 rounding bound (docs/design.md, "How exact is exact?")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def add_bandwidth(elements: int, min_seconds: float = 0.05) -> float:
    """Bytes of ``b`` added into ``a`` per second by numpy's ``a += b`` on float32 arrays of
    ``elements`` (median over repeats lasting at least ``min_seconds`` in all, at least 5). The same
    two arrays each time: below a few MiB they stay in the cache, which no fetched piece is, so this
    overstates what a blend could reach (the measure of records before :func:`memory_add_bandwidth`)."""
    a, b = np.zeros(max(1, elements), dtype=np.float32), np.ones(max(1, elements), dtype=np.float32)
    a += b  # first touch
    times: list[float] = []
    while len(times) < 5 or sum(times) < min_seconds:
        t = time.perf_counter()
        a += b
        times.append(time.perf_counter() - t)
    return b.nbytes / statistics.median(times)


def memory_add_bandwidth(arrays: list[tuple[np.ndarray, np.ndarray]], passes: int = 3) -> float:
    """Bytes of ``b`` added into ``a`` per second by numpy's ``a += b`` over every pair of
    ``arrays`` in turn (median over ``passes``): with pairs of the job's pieces' sizes, holding more
    than any cache (:func:`piece_arrays`), each ``b`` comes from memory, as a fetched piece does."""
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        for a, b in arrays:
            a += b
        rates.append(sum(b.nbytes for _, b in arrays) / (time.perf_counter() - t))
    return statistics.median(rates)


def piece_arrays(elements: list[int], min_bytes: int = 256 << 20) -> list[tuple[np.ndarray, np.ndarray]]:
    """Float32 pairs (a, b), one per piece of ``elements`` (C x Z x Y x X of each piece), the list
    repeated until they hold ``min_bytes``, so that every pair is out of the caches when its turn comes."""
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    while not pairs or sum(2 * b.nbytes for _, b in pairs) < min_bytes:
        pairs += [(np.full(max(1, n), 0.5, np.float32), np.ones(max(1, n), np.float32)) for n in elements]  # touched
    return pairs


class Measurement:
    """One job planned with one checkout's chunkflow, measured once per :meth:`once`.

    Args:
        input_url: the uint8 input volume (shared, read only).
        workdir: where this measurement's output volume and store go (its own).
        patch, overlap, block: ZYX strings, as ``plan`` takes them.
        batch: patches per model call.
        rate: simulated device ns per patch voxel; 0 runs the plain ``identity`` backend.
        cold: make the job's ``N`` (``Resources.weight_sum``) again at every repeat, so nothing it keeps
            from one block for the next (compact sums) carries over from the previous repeat's blocks.
    """

    def __init__(self, input_url: str, workdir: str, patch: str, overlap: str, block: str, batch: int,
                 rate: float, cold: bool = False) -> None:
        # internals on purpose: this also runs with the chunkflow of --baseline, which may predate the
        # public API (chunkflow.plan), and the simulated backend is injected through Resources, which
        # the API does not take
        from chunkflow.planning import plan
        from chunkflow.stages import Resources
        from sim_accelerator import SimulatedAccelerator

        self.workdir, self.cold = Path(workdir), cold
        self.job = job = plan(input_url, f"file://{self.workdir / 'out'}", f"file://{self.workdir / 'store'}",
                              "identity", patch, overlap=overlap, block=block, batch_size=batch)
        self.sim = SimulatedAccelerator(rate) if rate > 0 else None
        self.res = res = Resources(job, self.sim)
        res.backend, res.input, res.output, res.store, res.weight_sum  # what a worker opens once per job
        res.backend.predict(np.zeros((1, job.in_channels, *job.input_patch), dtype=np.float32))  # warm-up
        self.blocks = list(job.layout.block_indices())
        pieces = [d.piece.size for b in self.blocks for d in job.layout.donations_to(b)]
        self.piece_bytes = sum(pieces) * job.out_channels * 4  # float32 bytes stage two sums
        self.mean_piece = max(1, sum(pieces) * job.out_channels // max(1, len(pieces)))
        self.piece_pairs = piece_arrays([n * job.out_channels for n in pieces])

    def once(self, check: bool = False) -> dict:
        """Stage one over every block, stage two over every block, numpy's ``a += b``; with
        ``check``, the output against the identity reference. Returns a JSON-able record."""
        # the worker path itself (stage one pipelined over every block, one Resources, no markers), in
        # any checkout: the API's per-block functions go through the task path, one block at a time
        from chunkflow.stages import Stats, inference_and_donate_many
        try:
            from chunkflow.stage_two import receive_and_blend
        except ImportError:  # a checkout from before stage two had its own module
            from chunkflow.stages import receive_and_blend

        for sub in ("done", "donations"):
            shutil.rmtree(self.workdir / "store" / sub, ignore_errors=True)
        if self.sim is not None:
            self.sim.reset()
        if self.cold:
            self.res.__dict__.pop("weight_sum", None)  # a cached_property in every checkout measured
        stats1, stats2 = Stats(), Stats()
        t, c = time.perf_counter(), _cpu()
        for _, stats in inference_and_donate_many(self.job, iter(self.blocks), self.res):
            stats1.add(stats)
        wall1, cpu1 = time.perf_counter() - t, _cpu() - c
        busy = (self.sim.busy_seconds, self.sim.nominal_seconds, self.sim.voxels) if self.sim else (0.0, 0.0, 0)
        t, c = time.perf_counter(), _cpu()
        for block in self.blocks:
            stats2.add(receive_and_blend(self.job, block, self.res))
        wall2, cpu2 = time.perf_counter() - t, _cpu() - c
        record = {"stage1_wall": wall1, "stage1_cpu": cpu1, "stage1_seconds": stats1.seconds,
                  "busy_seconds": busy[0], "nominal_seconds": busy[1], "device_voxels": busy[2],
                  "busy_fraction": busy[0] / wall1, "stage2_wall": wall2, "stage2_cpu": cpu2,
                  "stage2_seconds": stats2.seconds, "stage2_voxels": stats2.voxels,
                  "received_bytes": stats2.donated_bytes, "piece_bytes": self.piece_bytes,
                  "blend_rate": self.piece_bytes / max(stats2.seconds.get("blend", 0.0), 1e-9),
                  "add_rate": add_bandwidth(self.mean_piece), "memory_add_rate": memory_add_bandwidth(self.piece_pairs),
                  "patches": stats1.patches,
                  "ns_per_voxel": (wall1 + wall2) / self.job.layout.bbox.size * 1e9}
        if check:
            record.update(self.difference())
        return record

    def difference(self) -> dict:
        """Max |output - identity reference| over the volume and over the blocks' cores (the cores
        must be bit-identical; the bands within float32 rounding, 1e-5). NaN counts as a difference."""
        # the reference cast to the output dtype, in any checkout (chunkflow.reference is the float32
        # one, and --baseline's chunkflow may predate it); the output read back: no volume I/O in the API
        from chunkflow.stages import Resources, cast_output, reference
        from chunkflow.storage import open_volume

        job = self.job
        expected = cast_output(reference(job, Resources(job)), job.output_dtype)
        got = open_volume(job.output).read(job.layout.bbox)
        if got.shape != expected.shape:
            return {"max_difference": float("inf"), "core_max_difference": float("inf")}
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        diff[np.isnan(got) != np.isnan(expected)] = np.inf
        diff[np.isnan(diff)] = 0.0  # NaN in both at the same voxel
        cores = [job.layout.core_box(b) for b in self.blocks]
        core = max((float(diff[(slice(None),) + c.slices(job.layout.bbox)].max()) for c in cores if not c.is_empty()),
                   default=0.0)
        return {"max_difference": float(diff.max()), "core_max_difference": core}


def serve(spec: str) -> None:
    """A measurement process: ``spec`` is the JSON of :class:`Measurement`'s arguments; each stdin
    line ``run`` or ``check`` answers one line ``@@result {json}`` on stdout; ``exit`` ends it."""
    m = Measurement(**json.loads(spec))
    where = Path(sys.modules["chunkflow"].__file__).parent
    print(MARK + json.dumps({"ready": True, "chunkflow": str(where)}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            return
        print(MARK + json.dumps(m.once(check=command == "check")), flush=True)


class Remote:
    """A :func:`serve` process measuring the chunkflow at ``root``."""

    def __init__(self, root: Path, spec: dict) -> None:
        env = {**os.environ, "CHUNKFLOW_BENCH_ROOT": str(root), "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_serve", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
        self.info = self._answer()

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"measurement process exited with status {self.proc.wait()}")

    def once(self, check: bool = False) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("check\n" if check else "run\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
            self.proc.wait()


def verdict(run: dict) -> str:
    """Invariant 1 on one checked run: cores bit-identical, bands within 1e-5 of the reference."""
    whole, core = run["max_difference"], run["core_max_difference"]
    if whole == 0.0:
        return "output == identity reference, bit for bit"
    text = f"max |output - reference| = {whole:.3g} (cores {core:.3g})"
    if core == 0.0 and whole <= TOLERANCE:
        return text + f": cores bit-identical, bands within float32 rounding (<= {TOLERANCE:g})"
    return text + "  ** INVARIANT 1 BROKEN **"


def spread(values: list[float]) -> dict:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def summarise(runs: list[dict]) -> dict:
    """Median and spread over repeats of what the table shows."""
    out = {key: spread([r[key] for r in runs]) for key in
           ("stage1_wall", "stage1_cpu", "busy_fraction", "stage2_wall", "stage2_cpu", "ns_per_voxel")}
    out["stage2_voxels_per_s"] = spread([r["stage2_voxels"] / r["stage2_wall"] for r in runs])
    out["stage2_received_mb_per_s"] = spread([r["received_bytes"] / r["stage2_wall"] / 1e6 for r in runs])
    out["blend_over_numpy"] = spread([r["blend_rate"] / r["memory_add_rate"] for r in runs])
    out["blend_over_cached_add"] = spread([r["blend_rate"] / r["add_rate"] for r in runs])
    out["blend_gbps"] = spread([r["blend_rate"] / 1e9 for r in runs])
    out["memory_add_gbps"] = spread([r["memory_add_rate"] / 1e9 for r in runs])
    out["cached_add_gbps"] = spread([r["add_rate"] / 1e9 for r in runs])
    out["device_bound_wall"] = spread([r["nominal_seconds"] for r in runs])
    for stage in ("stage1_seconds", "stage2_seconds"):
        phases = sorted({k for r in runs for k in r[stage]})
        out[stage] = {k: statistics.median([r[stage].get(k, 0.0) for r in runs]) for k in phases}
    return out


def print_table(names: list[str], sums: dict[str, dict], rate: float) -> None:
    width = max(len(n) for n in names) + 2
    rows = [("stage one wall (s)", "stage1_wall", 1.0, 3), ("stage one CPU (s)", "stage1_cpu", 1.0, 2),
            ("stage two wall (s)", "stage2_wall", 1.0, 3), ("stage two CPU (s)", "stage2_cpu", 1.0, 2),
            ("stage two Mvoxel/s (band)", "stage2_voxels_per_s", 1e-6, 1),
            ("stage two MB/s received", "stage2_received_mb_per_s", 1.0, 0),
            ("stage two blend, GB/s", "blend_gbps", 1.0, 2),
            ("numpy a+=b from memory, GB/s", "memory_add_gbps", 1.0, 2),
            ("stage two blend / a+=b memory", "blend_over_numpy", 1.0, 3),
            ("numpy a+=b cached (old), GB/s", "cached_add_gbps", 1.0, 2),
            ("blend / a+=b cached (old)", "blend_over_cached_add", 1.0, 3),
            ("ns per output voxel (both)", "ns_per_voxel", 1.0, 1)]
    if rate > 0:
        rows[:0] = [("accelerator busy (stage one)", "busy_fraction", 1.0, 3),
                    ("device-bound stage one (s)", "device_bound_wall", 1.0, 3)]
    print(f"{'median [min-max]':32s}" + "".join(f"{n:>{max(width, 26)}s}" for n in names))
    for label, key, scale, digits in rows:
        print(f"{label:32s}" + "".join(f"{fmt(sums[n][key], scale, digits):>{max(width, 26)}s}" for n in names))
    for stage in ("stage1_seconds", "stage2_seconds"):
        for n in names:
            phases = ", ".join(f"{k} {v:.3f}" for k, v in sums[n][stage].items())
            print(f"{stage.replace('_seconds', '')} phases (s, median), {n}: {phases}")


def main(rate: float = 30.0, identity: bool = False, shape: str | tuple = "64,384,384",
         block: str | tuple = "32,192,192", patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32",
         batch: int = 4, repeat: int = 5, synthetic: bool = True, baseline: str | None = None,
         keep: str | None = None, cold: bool = False) -> None:
    """Accelerator busy fraction and where the time goes, through both stages (see the module doc).

    Args:
        rate: simulated accelerator ns per patch voxel (device time per batch: rate x N x patch voxels); 0 runs
            the plain ``identity`` backend.
        identity: run the plain ``identity`` backend (same as ``--rate 0``).
        shape: input volume, ZYX.
        block: block size, ZYX.
        patch: input patch, ZYX.
        overlap: patch overlap, ZYX.
        batch: patches per model call.
        repeat: measurements per configuration (interleaved with the baseline's).
        synthetic: a synthetic EM volume (else uniform noise in 1..255, faster to make).
        baseline: another checkout's root (e.g. /tmp/baseline): measured the same way, interleaved,
            each in its own process, with ratios current / baseline.
        keep: a working directory to keep (default: a temporary one, removed at exit).
        cold: a fresh ``N`` at every repeat: a worker keeps the compact sums of ``N`` from block to block,
            which the interior blocks of a job share; the 8 blocks of the default layout all lie on the
            volume's faces and share none, so without ``--cold`` repeats 2.. find them kept from repeat 1.
    """
    from common import make_input, save, scratch, zyx

    rate = 0.0 if identity else float(rate)
    shape, block, patch, overlap = (zyx(v, w) for v, w in ((shape, "shape"), (block, "block"),
                                                           (patch, "patch"), (overlap, "overlap")))
    workdir = scratch("cf-bench-acc-", keep)
    url, _ = make_input(workdir, tuple(int(v) for v in shape.split(",")), synthetic=synthetic)
    spec = {"input_url": url, "patch": patch, "overlap": overlap, "block": block, "batch": int(batch), "rate": rate,
            "cold": bool(cold)}
    if baseline:
        roots = {"current": ROOT, "baseline": Path(baseline).resolve()}
        runners = {n: Remote(r, {**spec, "workdir": str(workdir / n)}) for n, r in roots.items()}
        for n, r in runners.items():
            print(f"{n}: chunkflow from {r.info['chunkflow']}")
    else:
        runners = {"current": Measurement(**spec, workdir=str(workdir / "current"))}
    names = list(runners)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for i in range(int(repeat)):
            for n in (names if i % 2 == 0 else names[::-1]):
                runs[n].append(runners[n].once(check=i == 0))
    finally:
        for r in runners.values():
            if isinstance(r, Remote):
                r.close()
    model = f"simulated accelerator, {rate:g} ns/voxel" if rate > 0 else "identity backend"
    print(f"\n{shape} uint8, blocks {block}, patch {patch}, overlap {overlap}, batch {batch}, {model}, "
          f"{repeat} repeats{' interleaved' if baseline else ''}; load {os.getloadavg()[0]:.2f}")
    for n in names:
        print(f"exactness ({n}): {verdict(runs[n][0])}")
    sums = {n: summarise(runs[n]) for n in names}
    print_table(names, sums, rate)
    ratios = {}
    if baseline:
        for key in ("stage1_wall", "stage2_wall", "ns_per_voxel", "busy_fraction"):
            if key == "busy_fraction" and rate == 0:
                continue
            pairs = [c[key] / b[key] for c, b in zip(runs["current"], runs["baseline"])]
            ratios[key] = spread(pairs)
            print(f"current / baseline {key}: {fmt(ratios[key])}")
    record = {"params": {**spec, "shape": shape, "repeat": int(repeat), "synthetic": synthetic, "baseline": baseline},
              "runs": runs, "summary": sums, "ratios": ratios}
    print(f"recorded in {save('accelerator', record)}")
    if any("BROKEN" in verdict(runs[n][0]) for n in names):
        raise SystemExit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_serve"]:
        serve(sys.argv[2])
    else:
        import fire

        fire.Fire(main)
