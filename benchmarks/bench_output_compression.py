"""Output compression of precomputed volumes: bytes and objects per teravoxel, write and read time.

For each output dtype (float32 probabilities, and the same scaled to uint8), each storage chunk size
and each ``--output-compression`` offered for the dtype here, write a realistic output volume with
chunkflow's own ``create_volume`` + ``write`` (one call, as a worker writes a block), read it back,
and count what landed on disk:

* bytes per voxel (= TB per teravoxel) and objects per teravoxel (one object per storage chunk);
* write and read seconds, with the ratio to ``none`` taken within each round: the choices run
  interleaved (round r writes every choice once, in an order rotated by r), so load that drifts
  over the run hits every choice alike; the median over ``repeats`` rounds and the spread (min-max);
* for lossless choices, that the read is bit-identical; for jpeg, the largest and the mean
  |difference| from the exact uint8 output.

The data is the demo U-Net's membrane probability map over a synthetic EM volume (``--data unet``,
computed in z slabs with an 8-voxel halo), or smooth values in [0, 1] with noise (``--data smooth``,
faster to make). Local files (file://), one process, CloudVolume's ``parallel=1`` as in chunkflow.

    python benchmarks/bench_output_compression.py                       # 128x512x512, 3 chunk sizes
    python benchmarks/bench_output_compression.py --shape 64,256,256 --chunks 16,64,64 --data smooth
"""
from __future__ import annotations

import logging
import shutil
import statistics
import time

import fire
import numpy as np

from common import save, scratch, zyx, zyx_list
from chunkflow import Bbox, Vec
# the output volumes' compressions are what this measures: chunkflow's storage layer is called directly
# (a layer written and read back per compression); the API has no volume I/O of its own
from chunkflow.storage import create_volume, open_volume
from chunkflow.storage.precomputed_codecs import is_lossless, precomputed_compressions

log = logging.getLogger("bench_output_compression")

CHUNKS = "16,64,64;64,128,128;128,128,128"


def unet_probabilities(shape: tuple[int, int, int], seed: int = 3, slab: int = 32, halo: int = 8) -> np.ndarray:
    """The demo U-Net's membrane probabilities (float32 ZYX) over a synthetic EM volume, computed
    ``slab`` z-sections at a time with ``halo`` sections of context on each side."""
    import torch

    # the demo U-Net's torch module itself, run on whole slabs (data to compress, not a chunkflow run)
    from chunkflow.demo import builtin_paths, make_em_volume
    from chunkflow.demo.unet import build_model

    model = build_model()
    model.load_state_dict(torch.load(builtin_paths("builtin:membrane")[1], weights_only=True))
    model.eval()
    image, _ = make_em_volume(shape, seed=seed)
    out = np.empty(shape, dtype=np.float32)
    with torch.inference_mode():
        for z0 in range(0, shape[0], slab):
            lo, hi = max(z0 - halo, 0), min(z0 + slab + halo, shape[0])
            x = torch.from_numpy(image[lo:hi].astype(np.float32) / 255)[None, None]
            out[z0:z0 + slab] = model(x)[0, 0].numpy()[z0 - lo:z0 - lo + slab]
    return out


def smooth_probabilities(shape: tuple[int, int, int], seed: int = 3) -> np.ndarray:
    """Smooth values in [0, 1] with a little noise (float32 ZYX)."""
    z, y, x = np.meshgrid(*(np.linspace(0, s / 16, s, dtype=np.float32) for s in shape), indexing="ij")
    noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return np.clip((np.sin(2 * x + y) * np.cos(z + y) + 1) / 2 + 0.02 * noise, 0, 1).astype(np.float32)


def _on_disk(root) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "info"]
    return len(files), sum(p.stat().st_size for p in files)


def measure_once(workdir, data: np.ndarray, chunk: Vec, compression: str) -> dict:
    """Write ``data`` (C,Z,Y,X) as a new layer with ``compression``, read it back, remove it."""
    root = workdir / f"out-{compression}"
    shutil.rmtree(root, ignore_errors=True)
    box = Bbox(Vec(0, 0, 0), Vec(data.shape[1:]))
    volume = create_volume(f"file://{root}", box, chunk, data.shape[0], str(data.dtype), compression=compression)
    t = time.perf_counter()
    volume.write(box, data)
    write = time.perf_counter() - t
    reader = open_volume(f"file://{root}")
    t = time.perf_counter()
    back = reader.read(box)
    read = time.perf_counter() - t
    objects, nbytes = _on_disk(root)
    error = np.abs(back.astype(np.float64) - data)
    shutil.rmtree(root)
    return {"write": write, "read": read, "objects": objects, "bytes": nbytes,
            "max_error": float(error.max()), "mean_error": float(error.mean())}


def measure(workdir, data: np.ndarray, chunk: Vec, compressions: list[str], repeats: int) -> list[dict]:
    """Every choice ``repeats`` times, interleaved (the order rotated each round); one row per choice."""
    runs: dict[str, list[dict]] = {c: [] for c in compressions}
    for r in range(repeats):
        order = compressions[r % len(compressions):] + compressions[:r % len(compressions)]
        for compression in order:
            runs[compression].append(measure_once(workdir, data, chunk, compression))
    voxels = data.size
    rows = []
    for compression, got in runs.items():
        base = runs.get("none", got)
        write_ratio = [g["write"] / b["write"] for g, b in zip(got, base)]
        read_ratio = [g["read"] / b["read"] for g, b in zip(got, base)]
        lossless = is_lossless(compression)
        if lossless and any(g["max_error"] for g in got):
            raise AssertionError(f"{compression} is meant to be lossless but read back different values")
        rows.append({
            "dtype": str(data.dtype), "chunk": list(chunk), "compression": compression,
            "bytes_per_voxel": got[0]["bytes"] / voxels,
            "objects_per_teravoxel": got[0]["objects"] / (voxels / data.shape[0]) * 1e12,
            "write_s": statistics.median(g["write"] for g in got),
            "write_mb_s": data.nbytes / statistics.median(g["write"] for g in got) / 1e6,
            "write_spread_s": [min(g["write"] for g in got), max(g["write"] for g in got)],
            "write_ratio": statistics.median(write_ratio), "write_ratio_spread": [min(write_ratio), max(write_ratio)],
            "read_s": statistics.median(g["read"] for g in got),
            "read_ratio": statistics.median(read_ratio), "read_ratio_spread": [min(read_ratio), max(read_ratio)],
            "lossless": lossless, "max_error": max(g["max_error"] for g in got),
            "mean_error": max(g["mean_error"] for g in got),
        })
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"{'dtype':8s} {'chunk ZYX':>12s} {'compression':11s} {'B/voxel':>8s} {'objects/TVx':>12s} "
          f"{'write s':>8s} {'MB/s':>6s} {'write/none (range)':>19s} {'read/none (range)':>18s}  values")
    for r in rows:
        wr, rr = r["write_ratio_spread"], r["read_ratio_spread"]
        values = "bit-identical" if r["lossless"] else \
            f"max |d| {r['max_error']:.0f}, mean {r['mean_error']:.2f} (of 255)"
        print(f"{r['dtype']:8s} {'x'.join(map(str, r['chunk'])):>12s} {r['compression']:11s} "
              f"{r['bytes_per_voxel']:8.3f} {r['objects_per_teravoxel']:12.3g} {r['write_s']:8.2f} "
              f"{r['write_mb_s']:6.1f} "
              f"{r['write_ratio']:6.2f} ({wr[0]:.2f}-{wr[1]:.2f}) {r['read_ratio']:6.2f} ({rr[0]:.2f}-{rr[1]:.2f})  "
              f"{values}")


def main(shape: str | tuple = "128,512,512", chunks: str | tuple = CHUNKS, repeats: int = 3, data: str = "unet",
         dtypes: str | tuple = "float32,uint8", keep: str | None = None) -> None:
    """Bytes and objects per teravoxel, write and read time of each output compression.

    Args:
        shape: the output volume, ZYX (128,512,512 or 128x512x512); each chunk size should divide it.
        chunks: storage chunk sizes, ZYX, ``;``-separated ("16,64,64;64,128,128;128,128,128").
        repeats: rounds; each round writes and reads every choice once, in a rotated order.
        data: ``unet`` (the demo U-Net's membrane map over synthetic EM) or ``smooth`` (quicker).
        dtypes: output dtypes, comma-separated: float32 (probabilities) and uint8 (scaled to 0..255).
        keep: a directory to work in and leave behind (default: a temporary one, removed).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("chunkflow").setLevel(logging.WARNING)  # not a line per volume created
    size = tuple(Vec.parse(zyx(shape, "shape")))
    chunk_sizes = [Vec.parse(c) for c in zyx_list(chunks, "chunks")]
    kinds = [d for d in (dtypes.split(",") if isinstance(dtypes, str) else dtypes) if d]
    if data not in ("unet", "smooth") or repeats < 1 or not set(kinds) <= {"float32", "uint8"}:
        raise SystemExit("error: --data is unet or smooth, --repeats >= 1, --dtypes from float32,uint8")
    workdir = scratch("cf-bench-compression-", keep)
    t = time.perf_counter()
    prob = unet_probabilities(size) if data == "unet" else smooth_probabilities(size)
    log.info("%s data %s made in %.1f s (mean %.3f)", data, "x".join(map(str, size)), time.perf_counter() - t,
             float(prob.mean()))
    arrays = {"float32": prob[None], "uint8": np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)[None]}
    rows = []
    for dtype in kinds:
        for chunk in chunk_sizes:
            # on file:// "default" writes what "none" does (uncompressed files)
            compressions = [c for c in precomputed_compressions(dtype, 1) if c != "default"]
            log.info("%s, chunks %s: %s x %d rounds", dtype, "x".join(map(str, chunk)), ", ".join(compressions),
                     repeats)
            rows += measure(workdir, arrays[dtype], chunk, compressions, repeats)
    _print_table(rows)
    record = {"shape": list(size), "data": data, "repeats": repeats, "rows": rows}
    print(f"recorded in {save('output_compression', record)}")


if __name__ == "__main__":
    fire.Fire(main)
