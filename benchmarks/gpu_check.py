"""The GPU check: the CUDA tests, chunkflow against MONAI on the GPU, the identity throughput; one table.

On one GPU, in under 5 minutes (``--quick``: about 2)::

    python benchmarks/gpu_check.py            # tests marked gpu, MONAI fp32 + bf16, identity
    python benchmarks/gpu_check.py --quick
    python benchmarks/gpu_check.py --device cpu --quick    # a dry run of every code path, tiny, no GPU

1. ``pytest -m gpu tests/test_gpu.py tests/test_device_blend.py`` (the second where it exists): the
   PyTorch backend on CUDA against the CPU (pinned memory, ``non_blocking`` copies, autocast, the
   double-buffered ``submit``), ``chunkflow.sliding_window`` against MONAI on the same CUDA tensor,
   two-stage runs on CUDA against the CPU reference, ONNX Runtime's CUDA provider, a Dask
   LocalCluster with one worker per GPU.
2. The same network (``bench_unet.py``), patch, overlap, gaussian blend and batch on the GPU, in
   float32 and bfloat16: MONAI's ``sliding_window_inference`` on the whole volume as one tensor
   (uploaded, and the result downloaded, inside its time), ``chunkflow.sliding_window`` on that
   tensor, and chunkflow's two stages on volumes (reading its input from and writing its output to
   precomputed volumes, every overlap through the donation store). Interleaved repeats; medians.
   Convolutions run in full float32 for both tools (TF32 off; ``--tf32`` turns it on for both).
3. The identity model through both stages, as ns per output voxel: the ``identity`` backend (host
   only) and a torch module returning its input on the device (the GPU path: uploads, downloads,
   device blending where chunkflow uses it).

Refuses in one line (exit 2) where CUDA is not available, unless ``--device cpu``. Exit status 1
if a test failed or an output is not what it must be. Records ``results/gpu_check.json`` (not
for ``--device cpu``).
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

from common import BENCH_NET, ROOT, Timed, make_input, run_two_stage, save, scratch, volume_url, zyx
import chunkflow
from chunkflow import Vec
# the model is loaded once per device and precision, handed to run_two_stage and its torch module to
# MONAI and to chunkflow.sliding_window: the API loads the job's model itself and does not hand it out
from chunkflow.backends import load_backend

#: (shape, patch, overlap, block, batch, repeats) of the MONAI comparison, and the identity volume
PROFILES = {
    "full": ("64,1024,1024", "16,128,128", "4,32,32", "32,512,512", 8, 3, "64,1024,1024"),
    "quick": ("32,512,512", "16,128,128", "4,32,32", "32,256,256", 8, 2, "32,1024,1024"),
    "cpu": ("16,96,96", "8,48,48", "2,12,12", "16,48,48", 2, 1, "16,128,128"),
}
IDENTITY_NET = '''import torch


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def build_model():
    return Identity()
'''


def refuse(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def card(device: str) -> dict:
    """The device and the versions that matter on it."""
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32": bool(torch.backends.cudnn.allow_tf32)}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=torch.cuda.get_device_name(torch.device(device)), memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(name="CPU (dry run)", bf16=True)
    try:
        import monai
        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    return info


def run_tests(device: str, quick: bool, timeout: int) -> dict:
    """pytest -m gpu on the test files; counts from its summary line."""
    files = ["tests/test_gpu.py"]
    if device.startswith("cuda") and (ROOT / "tests" / "test_device_blend.py").exists():
        files.append("tests/test_device_blend.py")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    env = dict(os.environ)
    if device == "cpu":
        env["CHUNKFLOW_GPU_TEST_DEVICE"] = "cpu"
        if quick:
            cmd += ["-k", "conv3_same"]
    elif ":" in device:
        env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    print("$", " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, code = partial + f"\ntimed out after {timeout} s", -1
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|skipped)", line)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", summary)}
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    for line in failed:
        print("  " + line[:300])
    if code not in (0, 5) and not failed:
        print(out[-3000:])
    return {"files": files, "seconds": round(time.perf_counter() - started, 1), "exit": code, **counts,
            "failed_tests": failed}


class Interleaved:
    """Wall seconds per label over interleaved repeats, stopped early past a deadline."""

    def __init__(self, deadline: float):
        self.deadline, self.walls, self.cut = deadline, {}, False

    def more(self, r: int) -> bool:
        if r > 0 and time.monotonic() > self.deadline:
            self.cut = True
            return False
        return True

    def add(self, label: str, seconds: float) -> None:
        self.walls.setdefault(label, []).append(seconds)

    def median(self, label: str) -> float:
        return statistics.median(self.walls[label])

    def text(self, label: str) -> str:
        w = self.walls[label]
        return f"{statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f})" if len(w) > 1 else f"{w[0]:.2f}"


def monai_run(image: np.ndarray, net: torch.nn.Module, device: str, precision: str, patch: Vec, overlap: Vec,
              batch: int) -> np.ndarray:
    """MONAI's whole-volume inference on the device; upload and download included."""
    from monai.inferers import sliding_window_inference

    predictor = autocast_predictor(net, device, precision)
    with torch.inference_mode():
        x = torch.from_numpy(image).to(device)[None, None].float().div_(255.0)
        out = sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=batch, predictor=predictor,
                                       overlap=[(v - 0.5) / p for v, p in zip(overlap, patch)], mode="gaussian",
                                       sigma_scale=0.125)
        return out[0].cpu().numpy()


def autocast_predictor(net: torch.nn.Module, device: str, precision: str):
    """The module as the PyTorch backend runs it: autocast in reduced precision, float32 out."""
    if precision == "float32":
        return net
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            return net(x).float()
    return predict


def memory_run(image: np.ndarray, net: torch.nn.Module, device: str, precision: str, patch: Vec, overlap: Vec,
               batch: int) -> np.ndarray:
    """``chunkflow.sliding_window`` of the uint8 volume as a device tensor; upload and download included."""
    tensor = torch.from_numpy(image).to(device)
    return chunkflow.sliding_window(tensor, autocast_predictor(net, device, precision), tuple(patch),
                                    overlap=tuple(overlap), blend="gaussian", batch_size=batch).cpu().numpy()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def versus_monai(workdir: Path, device: str, precisions: list[str], profile: tuple, deadline: float) -> list[dict]:
    """Rows of the comparison: per precision, MONAI, chunkflow in memory, chunkflow's two stages."""
    shape, patch, overlap, block, batch, repeats, _ = profile
    url, image = make_input(workdir, tuple(Vec.parse(shape)), synthetic=False)  # noise: quick to make, no blank patch
    patch_v, overlap_v = Vec.parse(patch), Vec.parse(overlap)
    rows = []
    for precision in precisions:
        backend = load_backend(BENCH_NET, device=device, precision=precision)
        net = backend.module
        monai_run(image[tuple(slice(0, p) for p in patch_v)], net, device, precision, patch_v, overlap_v, 1)  # warm
        times, outputs = Interleaved(deadline), {}
        for r in range(repeats):
            if not times.more(r):
                break
            job = chunkflow.plan(url, volume_url(workdir / f"out-{precision}-{r}"),
                                 str(workdir / f"job-{precision}-{r}"), BENCH_NET, patch, overlap=overlap,
                                 block=block, blend="gaussian", batch_size=batch, device=device,
                                 precision=precision)
            run = run_two_stage(job, backend)
            times.add("two stages", run.wall)
            outputs["two stages"] = run.output[0]
            for label, fn in (("MONAI", monai_run), ("in memory", memory_run)):
                sync(device)
                with Timed() as t:
                    outputs[label] = fn(image, net, device, precision, patch_v, overlap_v, batch)[0]
                times.add(label, t.wall)
            print(f"  {precision} #{r}: two stages {times.walls['two stages'][-1]:.2f} s, MONAI "
                  f"{times.walls['MONAI'][-1]:.2f} s, in memory {times.walls['in memory'][-1]:.2f} s", flush=True)
        voxels = int(np.prod(image.shape))
        for label, what in (("MONAI", "MONAI sliding_window_inference (device tensor)"),
                            ("in memory", "chunkflow.sliding_window (device tensor)"),
                            ("two stages", "chunkflow two stages (volumes, donations)")):
            rows.append({"what": what, "precision": precision, "wall": times.text(label),
                         "wall_median": round(times.median(label), 4), "walls": times.walls[label],
                         "ns_per_voxel": round(1e9 * times.median(label) / voxels, 2),
                         "vs_monai": round(times.median(label) / times.median("MONAI"), 4),
                         "max_diff_vs_monai": float(np.abs(outputs[label] - outputs["MONAI"]).max()),
                         "repeats": len(times.walls[label]), "cut_by_budget": times.cut})
    return rows


def identity_throughput(workdir: Path, device: str, profile: tuple, deadline: float) -> list[dict]:
    """ns per output voxel through both stages with the identity: host backend, torch on the device."""
    _, patch, overlap, block, batch, repeats, shape = profile
    url, image = make_input(workdir / "identity", tuple(Vec.parse(shape)), synthetic=False)
    net_file = workdir / "identity_net.py"
    net_file.write_text(IDENTITY_NET)
    expected = image.astype(np.float32) / np.float32(255)
    rows = []
    for v, (label, model, on) in enumerate((("identity backend (host), two stages", "identity", "cpu"),
                                            (f"torch identity on {device}, two stages", str(net_file), device))):
        backend = load_backend(model, device=on)
        times, exact = Interleaved(deadline), 0.0
        for r in range(max(1, repeats - 1)):
            if not times.more(r):
                break
            job = chunkflow.plan(url, volume_url(workdir / f"id{v}-{r}"), str(workdir / f"idjob{v}-{r}"), model, patch,
                                 overlap=overlap, block=block, blend="gaussian", batch_size=batch, device=on)
            run = run_two_stage(job, backend)
            exact = max(exact, float(np.abs(run.output[0] - expected).max()))
            times.add("s1", run.stage1.wall)
            times.add("s2", run.stage2.wall)
            times.add("both", run.wall)
        voxels = int(np.prod(image.shape))
        ns = {k: round(1e9 * times.median(k) / voxels, 2) for k in ("s1", "s2", "both")}
        print(f"  {label}: {ns['both']} ns/voxel (stage one {ns['s1']}, stage two {ns['s2']}); max |out - in| "
              f"{exact:.1e}", flush=True)
        rows.append({"what": label, "precision": "float32", "wall": times.text("both"), "ns_per_voxel": ns["both"],
                     "ns_stage1": ns["s1"], "ns_stage2": ns["s2"], "max_diff_vs_input": exact,
                     "repeats": len(times.walls["both"]), "cut_by_budget": times.cut})
    return rows


def table(info: dict, tests: dict | None, rows: list[dict], shapes: str) -> str:
    lines = [f"chunkflow GPU check: {info['name']} ({info['device']}), torch {info['torch']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}, MONAI {info['monai']}, TF32 {'on' if info['tf32'] else 'off'}; {shapes}"]
    if tests is not None:
        counts = ", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "skipped", "error", "errors")
                           if tests.get(k, 0) or k in ("passed", "failed"))
        lines.append(f"tests (-m gpu, {', '.join(tests['files'])}): {counts} in {tests['seconds']} s")
    lines += ["", "| what | precision | wall s, median (min-max) | ns / output voxel | ÷ MONAI | max \\|diff\\| |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['vs_monai']:.3f}" if "vs_monai" in r else ""
        diff = r.get("max_diff_vs_monai", r.get("max_diff_vs_input"))
        ns = f"{r['ns_per_voxel']}" + (f" ({r['ns_stage1']} + {r['ns_stage2']})" if "ns_stage1" in r else "")
        lines.append(f"| {r['what']} | {r['precision']} | {r['wall']} | {ns} | {ratio} | {diff:.1e} |")
    if any(r.get("cut_by_budget") for r in rows):
        lines.append("(some repeats were left out to stay within --budget)")
    return "\n".join(lines)


def main(device: str = "cuda", quick: bool = False, tests: bool = True, monai: bool = True, identity: bool = True,
         tf32: bool = False, budget: float = 280.0, test_timeout: int = 200, workdir: str | None = None) -> None:
    """The GPU check (see the module's docstring); prints one table, exit 1 if something is wrong.

    Args:
        device: cuda, cuda:N, or cpu (a dry run at tiny sizes, to check the code paths without a GPU).
        quick: smaller volumes, fewer repeats (about 2 minutes on one GPU).
        tests: run the gpu tests first (--notests: skip them).
        monai: the comparison with MONAI (--nomonai: skip it).
        identity: the identity throughput (--noidentity: skip it).
        tf32: let cuDNN use TF32 for float32 convolutions in both tools (default: full float32).
        budget: seconds after which no further repeat starts (the tests' time included).
        test_timeout: seconds the tests may take.
        workdir: keep volumes and jobs here (default: a temporary directory, removed).
    """
    device = str(device).strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        refuse(f"--device {device!r} must be cuda, cuda:N or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        refuse(f"CUDA is not available here (torch {torch.__version__}, torch.cuda.is_available() is False); run this "
               "on a GPU machine, or --device cpu --quick for a dry run of the code paths")
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        refuse(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    started = time.monotonic()
    deadline = started + float(budget)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    profile = PROFILES["cpu" if device == "cpu" else "quick" if quick else "full"]
    info = card(device)
    print(f"{info['name']} ({device}), torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}", flush=True)
    tested = run_tests(device, bool(quick), int(test_timeout)) if tests else None
    work = scratch("cf-gpu-check-", None if workdir is None else str(workdir))
    rows: list[dict] = []
    if monai and info["monai"] is None:
        print("  MONAI is not installed: its comparison is left out", flush=True)
    elif monai:
        precisions = ["float32"] + (["bfloat16"] if info["bf16"] else [])
        rows += versus_monai(work, device, precisions, profile, deadline)
    if identity:
        rows += identity_throughput(work, device, profile, deadline)
    shapes = (f"volume {zyx(profile[0])} uint8, patch {zyx(profile[1])}, overlap {zyx(profile[2])}, block "
              f"{zyx(profile[3])}, batch {profile[4]}, gaussian; identity volume {zyx(profile[6])}")
    text = table(info, tested, rows, shapes)
    print("\n" + text)
    limit = 1e-5 if not tf32 else float("inf")  # the README's tolerance; TF32 rounds products to ~1e-3
    bad = [r["what"] for r in rows if r["precision"] == "float32" and r.get("max_diff_vs_monai", 0) > limit]
    bad += [r["what"] for r in rows if r.get("max_diff_vs_input", 0) > 1e-5]
    failed = tested is not None and (tested["exit"] not in (0, 5) or tested.get("failed", 0) > 0)
    if bad:
        print(f"wrong outputs: {'; '.join(bad)}")
    record = {"card": info, "tests": tested, "rows": rows, "shapes": shapes, "quick": bool(quick)}
    where = save("gpu_check", record) if device != "cpu" else "nowhere (a dry run on the CPU)"
    print(f"total {time.monotonic() - started:.0f} s; recorded in {where}")
    if failed or bad:
        raise SystemExit(1)


if __name__ == "__main__":
    fire.Fire(main)
