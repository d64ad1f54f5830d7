"""CPU of the donation codec per output voxel: stage one's encode, stage two's decode and verify.

For every block of a job's layout (no volumes, no store, no model) each piece the block donates is
encoded from a strided view of a random float32 chunk, as ``block_writes`` hands it over (an
encoder from before issue 11's copy-free encode makes it contiguous itself, as its
``block_writes`` did), and every encoded piece is then decoded and verified as stage two does
(``decode_donation(copy=False)``). CPU is this thread's (``time.thread_time``), so other
processes on a shared machine inflate it less than wall time. With ``--baseline DIR``, the same
runs with another checkout's chunkflow in its own process, interleaved, order alternating::

    python benchmarks/bench_donation_codec.py --repeat 7 --baseline /tmp/baseline
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "@@codec "


def measure(shape: str, block: str, patch: str, overlap: str, repeat: int, compression: str) -> dict:
    """Median CPU ns per output voxel of encoding and of decoding every donation of the layout."""
    import numpy as np

    # the donation codec alone (encode, decode and verify; no volume, store or model), with the chunkflow
    # of --baseline too, which may predate the public API: internals on purpose
    from chunkflow.bbox import Bbox, Vec
    from chunkflow.geometry import Layout
    from chunkflow.job import default_storage_chunk
    from chunkflow.storage.donation_codec import decode_donation, encode_donation

    block_v = Vec.parse(block)
    layout = Layout(Bbox(Vec(0, 0, 0), Vec.parse(shape)), Vec.parse(patch), Vec.parse(overlap), block_v,
                    default_storage_chunk(block_v))
    rng = np.random.default_rng(0)
    work = []
    for idx in layout.block_indices():
        chunk = layout.chunk_box(idx)
        if chunk is not None:
            work.append((chunk, rng.random((1, *chunk.shape), dtype=np.float32), layout.donations_from(idx)))
    encode_s, decode_s = [], []
    for _ in range(repeat):
        encoded = []
        t = time.thread_time()
        for chunk, out, donations in work:
            for d in donations:
                piece = out[(slice(None),) + d.piece.slices(chunk)]
                encoded.append((d.key, encode_donation(piece, d.piece, d.key, "job", compression=compression)))
        encode_s.append(time.thread_time() - t)
        t = time.thread_time()
        for key, data in encoded:
            decode_donation(data, key, "job", 1, "float32", copy=False)
        decode_s.append(time.thread_time() - t)
    voxels = layout.bbox.size
    return {"encode_ns": [s / voxels * 1e9 for s in encode_s], "decode_ns": [s / voxels * 1e9 for s in decode_s],
            "pieces": len(encoded), "mib": sum(len(d) for _, d in encoded) / 2 ** 20}


def _in_process(root: Path, args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_measure", json.dumps(args)], env=env,
                          cwd=root, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith(MARK))
    return json.loads(line[len(MARK):])


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main(shape: str | tuple = "64,384,384", block: str | tuple = "32,192,192", patch: str | tuple = "16,128,128",
         overlap: str | tuple = "4,32,32", repeat: int = 7, compression: str = "none", processes: int = 4,
         baseline: str | None = None) -> None:
    """Codec CPU per output voxel (see the module doc).

    Args:
        shape, block, patch, overlap: the layout, ZYX (the defaults are bench_accelerator's).
        repeat: encode and decode passes per process (the median of each process is reported).
        compression: none, zstd or blosc.
        processes: measurement processes per checkout (interleaved with the baseline's).
        baseline: another checkout's root, measured the same way.
    """
    from common import zyx

    args = {"shape": zyx(shape, "shape"), "block": zyx(block, "block"), "patch": zyx(patch, "patch"),
            "overlap": zyx(overlap, "overlap"), "repeat": int(repeat), "compression": str(compression)}
    roots = {"current": Path(__file__).resolve().parent.parent} | ({"baseline": Path(baseline)} if baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in roots}
    for i in range(int(processes)):
        for name in (list(roots) if i % 2 == 0 else list(roots)[::-1]):
            runs[name].append(_in_process(roots[name], args))
    first = runs["current"][0]
    print(f"{args['shape']}, blocks {args['block']}, compression {args['compression']}: {first['pieces']} pieces, "
          f"{first['mib']:.1f} MiB; load {os.getloadavg()[0]:.2f}; CPU ns per output voxel, median [min-max] "
          f"of {processes} processes' medians of {repeat}")
    for name, rows in runs.items():
        enc = [statistics.median(r["encode_ns"]) for r in rows]
        dec = [statistics.median(r["decode_ns"]) for r in rows]
        print(f"  {name:8s} encode {_fmt(enc)}   decode + verify {_fmt(dec)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_measure"]:
        print(MARK + json.dumps(measure(**json.loads(sys.argv[2]))))
    else:
        import fire

        fire.Fire(main)
