"""CPU per voxel of stage one's storage calls on a local precomputed layer, by way of reading and writing.

The boxes are stage one's, from a job planned like ``bench_accelerator.py``'s (64x384x384 uint8
input in 16x64x64 raw chunks, blocks 32x192x192, patch 16x128x128, overlap 4x32x32): the reads are
every block's input chunk with its context margin (not chunk-aligned), the writes every block's
core in chunk-thick float32 slabs (chunk-aligned, 16x64x64 chunks). Each way below does all of
them once per repeat; the ways are interleaved and their order reversed every other repeat.

Reads:
- ``cloudvolume``: chunkflow's CloudVolume path (``parallel=1, progress=False``; the job's
  input refuses missing chunks, so ``fill_missing=False``);
- ``cv-fill``, ``cv-lru``: the same with ``fill_missing=True`` or a 64 MiB LRU of chunks (the
  blocks' reads overlap, so some chunks are read twice);
- ``tensorstore``: the ``neuroglancer_precomputed`` driver on ``file://``, one data-copy thread,
  two file threads, no cache;
- ``direct``: chunkflow's chunk-file path (``chunkflow/storage/precomputed_files.py``).

Writes (into a layer created by chunkflow, ``compression`` none or gzip):
- ``cloudvolume`` (chunkflow's, ``non_aligned_writes=False``, ``compress=False`` or ``"gzip"``),
  ``cv-black`` (``delete_black_uploads=True``), ``tensorstore`` (``store_data_equal_to_fill_value``
  so every chunk is stored, ``file_io_sync`` off), ``direct``.

Every way's output is checked before timing: every chunk file byte for byte against CloudVolume's
(same names, same bytes), and every layer read back through CloudVolume and tensorstore equal to the
data written; every way's reads equal CloudVolume's. ``tensorstore`` is left out where the layer is
gzip (it does not read ``NAME.gz`` files) or where it is not installed.

    python benchmarks/bench_volume_io.py                       # raw, 7 repeats
    python benchmarks/bench_volume_io.py --compression gzip --repeat 5
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_input, save, scratch  # noqa: E402

import chunkflow  # noqa: E402
from chunkflow import Bbox  # noqa: E402
# volume I/O is what this measures: stage one's slabs and chunkflow's storage layer (CloudVolume and its
# chunk-file path) are called directly; the API has no volume I/O of its own
from chunkflow.stages import write_slabs  # noqa: E402
from chunkflow.storage import create_volume, open_volume  # noqa: E402
from chunkflow.storage.precomputed import PrecomputedVolume  # noqa: E402


def _cloudvolume(vol: PrecomputedVolume, **options) -> PrecomputedVolume:
    """``vol`` read and written through CloudVolume, with ``options`` changed from chunkflow's."""
    vol._files = None
    if options:
        vol._cv = vol._cloudvolume(vol._location, mip=vol.mip, **{"fill_missing": vol.missing == "zeros", **options})
    return vol


def _tensorstore(path: Path, write: bool):
    """The layer at ``path`` as a C,Z,Y,X tensorstore."""
    import tensorstore as ts

    context = ts.Context({"data_copy_concurrency": {"limit": 1}, "file_io_concurrency": {"limit": 2},
                          "file_io_sync": False, "cache_pool": {"total_bytes_limit": 0}})
    spec = {"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}/", "recheck_cached_data": False}
    if write:
        spec["store_data_equal_to_fill_value"] = True
    return ts.open(spec, context=context, read=True, write=write).result().T  # X,Y,Z,C -> C,Z,Y,X


def _ts_box(store, bbox: Bbox):
    return store[(slice(None),) + tuple(slice(a, b) for a, b in zip(bbox.start, bbox.stop))]


def _tree(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "info")
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main(repeat: int = 7, compression: str = "none", keep: str | None = None) -> None:
    """Measure (see the module doc) and append the record to ``results/volume_io.json``.

    Args:
        repeat: timed repeats of every way (after one untimed round that also checks the bytes).
        compression: the layers' output compression: ``none`` (raw files) or ``gzip`` (``NAME.gz``).
        keep: a working directory to keep (default: a temporary one, removed at exit).
    """
    workdir = scratch("cf-bench-volio-", keep)
    url, image = make_input(workdir, (64, 384, 384))
    job = chunkflow.plan(url, f"file://{workdir / 'out'}", f"file://{workdir / 'store'}", "identity", "16,128,128",
                         overlap="4,32,32", block="32,192,192", batch_size=4)
    source = workdir / "input"
    if compression == "gzip":  # the same input, as NAME.gz chunks
        gz = create_volume(f"file://{workdir / 'input_gz'}", job.layout.bbox, open_volume(url).chunk_size, 1, "uint8",
                           compression="gzip")
        gz.write(gz.bbox, image[None])
        source = workdir / "input_gz"
    blocks = list(job.layout.block_indices())
    reads = [job.layout.chunk_box(b).grow(job.context_margin) for b in blocks]
    slabs = [s for b in blocks for s in write_slabs(job.layout.core_box(b), job.storage_chunk[0], 4)
             if not job.layout.core_box(b).is_empty()]
    rng = np.random.default_rng(0)
    data = [rng.random((1, *s.shape), dtype=np.float32) for s in slabs]

    def opened(path: Path) -> PrecomputedVolume:
        return open_volume(f"file://{path}", missing="refuse")  # type: ignore[return-value]

    with_lru = _cloudvolume(opened(source), lru_bytes=64 << 20)

    def lru_read(box: Bbox) -> np.ndarray:
        if box == reads[0]:  # a new round: only chunks that the blocks' reads share may hit
            with_lru._cv.image.lru.clear()
        return with_lru.read(box)

    readers: dict[str, Callable[[Bbox], np.ndarray]] = {
        "cloudvolume": _cloudvolume(opened(source)).read,
        "cv-fill": _cloudvolume(opened(source), fill_missing=True).read,
        "cv-lru": lru_read,
        "direct": opened(source).read,
    }
    with_ts = compression == "none" and importlib.util.find_spec("tensorstore") is not None
    if with_ts:
        ts_in = _tensorstore(source, write=False)
        readers["tensorstore"] = lambda box: np.asarray(_ts_box(ts_in, box).read().result())

    def layer(name: str) -> PrecomputedVolume:
        return create_volume(f"file://{workdir / name}", job.layout.bbox, job.storage_chunk, 1, "float32",
                             compression=compression)  # type: ignore[return-value]

    writers: dict[str, Callable[[Bbox, np.ndarray], None]] = {
        "cloudvolume": _cloudvolume(layer("w-cloudvolume")).write,
        "cv-black": _cloudvolume(layer("w-cv-black"), delete_black_uploads=True).write,
        "direct": layer("w-direct").write,
    }
    if with_ts:
        layer("w-tensorstore")
        ts_out = _tensorstore(workdir / "w-tensorstore", write=True)
        writers["tensorstore"] = lambda box, d: _ts_box(ts_out, box).write(d).result()

    # -- the check, untimed: every read equal to CloudVolume's, every layer's files equal to CloudVolume's
    expected = [readers["cloudvolume"](box) for box in reads]
    for name, read in readers.items():
        assert all(np.array_equal(read(box), want) for box, want in zip(reads, expected)), f"{name} read differs"
    for write in writers.values():
        for box, d in zip(slabs, data):
            write(box, d)
    reference = _tree(workdir / "w-cloudvolume")
    for name in writers:
        assert _tree(workdir / f"w-{name}") == reference, f"{name} wrote other files or other bytes"
        back = _cloudvolume(opened(workdir / f"w-{name}"))
        ts_back = _tensorstore(workdir / f"w-{name}", write=False) if with_ts else None
        for box, d in zip(slabs, data):
            assert np.array_equal(back.read(box), d), f"{name}: CloudVolume reads back other values"
            if ts_back is not None:
                assert np.array_equal(np.asarray(_ts_box(ts_back, box).read().result()), d), \
                    f"{name}: tensorstore reads back other values"
    print(f"checked: {len(reads)} reads equal through {', '.join(readers)}; {len(reference)} chunk files "
          f"byte-identical through {', '.join(writers)}, read back equal through CloudVolume"
          f"{' and tensorstore' if with_ts else ''}")

    ways = [("read", n, (lambda r=r: [r(box) for box in reads])) for n, r in readers.items()]
    ways += [("write", n, (lambda w=w: [w(box, d) for box, d in zip(slabs, data)])) for n, w in writers.items()]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {(k, n): [] for k, n, _ in ways}
    for i in range(int(repeat)):
        for kind, name, fn in (ways if i % 2 == 0 else ways[::-1]):
            times[(kind, name)].append(_timed(fn))
    voxels = {"read": sum(b.size for b in reads), "write": sum(b.size for b in slabs)}
    output = job.layout.bbox.size
    print(f"\n{compression} chunks; reads: {len(reads)} boxes, {voxels['read']} voxels; writes: {len(slabs)} slabs, "
          f"{voxels['write']} voxels; {output} output voxels; {repeat} repeats; load {os.getloadavg()[0]:.2f}")
    print(f"{'':6s} {'way':12s} {'CPU ns/voxel':>22s} {'CPU ns/output voxel':>22s} {'wall ns/voxel':>22s} "
          f"{'CPU vs cloudvolume':>20s}")
    record: dict[str, dict] = {}
    for (kind, name), runs in times.items():
        cpu = [c / voxels[kind] * 1e9 for c, _ in runs]
        out = [c / output * 1e9 for c, _ in runs]
        wall = [w / voxels[kind] * 1e9 for _, w in runs]
        base = statistics.median(c for c, _ in times[(kind, "cloudvolume")])
        record[f"{kind}/{name}"] = {"cpu_ns_per_voxel": cpu, "cpu_ns_per_output_voxel": out, "wall_ns_per_voxel": wall}
        print(f"{kind:6s} {name:12s} {_spread(cpu):>22s} {_spread(out):>22s} {_spread(wall):>22s} "
              f"{base / statistics.median(c for c, _ in runs):>19.2f}x")
    where = save("volume_io", {"compression": compression, "repeat": int(repeat), "voxels": voxels,
                               "output_voxels": output, "ways": record})
    print(f"recorded in {where}")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


if __name__ == "__main__":
    import fire

    fire.Fire(main)
