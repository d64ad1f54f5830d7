"""Shared pieces of the benchmarks: the machine, the test volume, timers, our two-stage run.

Benchmarks are scripts, not tests: they print what they measured and append a JSON record to
``benchmarks/results/`` that ``benchmarks/plots.py`` turns into the figures of
``docs/benchmarks.md``. Times are wall-clock seconds, with the process's CPU seconds (all
threads) beside them: this machine may be shared, and CPU seconds are what a busy neighbour
does not inflate.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCH_NET = str(HERE / "bench_unet.py")
sys.path.insert(0, str(ROOT))

from chunkflow import Bbox, Vec  # noqa: E402
from chunkflow.demo import make_em_volume  # noqa: E402
# run_two_stage times the stage functions themselves: one Resources opened once (with an injected,
# already loaded backend), stage one pipelined over every block by inference_and_donate_many, and no
# done/running markers; chunkflow.run and chunkflow.inference_and_donate go through the engines' task
# path (markers, a Resources per task), so they would measure something else.
from chunkflow.stage_two import receive_and_blend  # noqa: E402
from chunkflow.stages import Resources, Stats, inference_and_donate_many  # noqa: E402
# the benchmarks' input volumes and reading outputs back: the API has no volume I/O of its own
from chunkflow.storage import create_volume, open_volume  # noqa: E402


def machine() -> dict:
    """What this ran on: CPU model (lscpu), cores, memory, library versions, load."""
    import torch

    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_1min": os.getloadavg()[0]}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, every thread included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Timed:
    wall: float = 0.0
    cpu: float = 0.0
    load: float = 0.0
    _t: tuple = field(default=(0.0, 0.0), repr=False)

    def __enter__(self) -> "Timed":
        self._t = (time.perf_counter(), cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t[0]
        self.cpu = cpu_seconds() - self._t[1]
        self.load = os.getloadavg()[0]


def scratch(prefix: str, keep: str | None = None) -> Path:
    """A working directory: ``keep`` if given (left in place), else a temporary one removed at exit."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


#: the volume format the benchmarks write: precomputed, or zarr where CloudVolume is not installed
#: (a GPU machine that carries only what the GPU check needs)
FORMAT = os.environ.get("CHUNKFLOW_BENCH_FORMAT") or ("precomputed" if importlib.util.find_spec("cloudvolume") else "zarr")


def volume_url(path: Path) -> str:
    """Where a benchmark volume at ``path`` lives, in :data:`FORMAT`."""
    return f"file://{path}" if FORMAT == "precomputed" else f"{path}.zarr"


def make_input(workdir: Path, shape: tuple[int, int, int], chunk=(16, 64, 64), seed: int = 1,
               synthetic: bool = True) -> tuple[str, np.ndarray]:
    """A synthetic EM volume (or uniform noise in 1..255, faster to make) as uint8 at
    ``workdir/input`` (precomputed, raw encoding, or zarr: :data:`FORMAT`)."""
    if synthetic:
        image, _ = make_em_volume(shape, seed=seed)
    else:
        image = np.random.default_rng(seed).integers(1, 256, size=shape, dtype=np.uint8)
    url = volume_url(workdir / "input")
    volume = create_volume(url, Bbox(Vec(0, 0, 0), Vec(shape)), Vec(chunk), 1, "uint8")
    volume.write(volume.bbox, image[None])
    return url, image


@dataclass
class TwoStage:
    stage1: Timed
    stage2: Timed
    stats1: Stats
    stats2: Stats
    output: np.ndarray

    @property
    def wall(self) -> float:
        return self.stage1.wall + self.stage2.wall

    @property
    def cpu(self) -> float:
        return self.stage1.cpu + self.stage2.cpu


def run_two_stage(job, backend=None, read_output: bool = True) -> TwoStage:
    """Stage one over every block (input of the next block prefetched), the barrier, stage two."""
    res = Resources(job, backend)
    res.backend, res.input, res.output, res.store, res.weight_sum  # what a worker opens once per job
    backend = res.backend
    backend.predict(np.zeros((1, job.in_channels, *job.input_patch), dtype=np.float32))  # warm-up, as MONAI gets
    stats1, stats2 = Stats(), Stats()
    with Timed() as t1:
        for _, stats in inference_and_donate_many(job, job.layout.block_indices(), res):
            stats1.add(stats)
    with Timed() as t2:
        for idx in job.layout.block_indices():
            stats2.add(receive_and_blend(job, idx, res))
    output = open_volume(job.output).read(job.layout.bbox) if read_output else np.empty(0)
    return TwoStage(t1, t2, stats1, stats2, output)


def zyx(value, what: str = "size") -> str:
    """A ZYX size as the scripts' flags give it, as the string ``"16,128,128"``.

    Fire turns ``--patch 16,128,128`` into the tuple ``(16, 128, 128)`` and ``--patch 16`` into an
    int; ``16x128x128`` and a quoted ``"16,128,128"`` stay strings. All of them are accepted.
    """
    return ",".join(str(v) for v in Vec.parse(value, what))


def zyx_list(value, what: str = "sizes") -> list[str]:
    """A list of ZYX sizes: ``"16,256,256;32,256,256"`` (``;``-separated; empty entries skipped), one
    size (a string or the tuple Fire makes of ``16,256,256``), or a list/tuple of sizes."""
    if isinstance(value, str):
        return [zyx(v, what) for v in value.split(";") if v.strip()]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return [zyx(value, what)]
    if isinstance(value, (list, tuple)):
        return [zyx(v, what) for v in value]
    return [zyx(value, what)]


def choice(value, options: tuple[str, ...], flag: str) -> str:
    """``value`` if it is one of ``options``; else exit with status 2 and one line, as argparse's ``choices`` did."""
    if str(value) not in options:
        print(f"error: --{flag.replace('_', '-')} must be one of {', '.join(options)}, not {value!r}", file=sys.stderr)
        raise SystemExit(2)
    return str(value)


def save(name: str, record: dict) -> Path:
    """Append ``record`` (with the machine and a timestamp) to ``results/{name}.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **record})
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return path
