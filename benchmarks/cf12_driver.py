"""Runs chunkflow 1.2.0's chunk inference over the blocks of a volume (inside its own venv).

Invoked by ``bench_vs_chunkflow12.py`` as ``/tmp/cf12venv/bin/python -P cf12_driver.py JSON``
(``-P`` keeps this repository's chunkflow off ``sys.path``, so ``import chunkflow`` is 1.2.0).
``JSON`` is one argument, an object with the keys ``input`` (precomputed input, file://...),
``output`` (float32 precomputed output to create), ``net`` (a .py file defining ``build_model()``,
only torch needed), ``weights`` (its state dict), ``adapter`` (where to write the 1.2.0 model
file), ``patch``, ``overlap``, ``block`` (ZYX, ``[16, 128, 128]`` or ``"16,128,128"``) and
optionally ``batch`` (default 1). One JSON argument rather than flags: this runs in 1.2.0's venv,
where python-fire (this project's command-line library) is not guaranteed, since chunkflow 1.2.0
does not depend on it.

What it does per block, as a 1.2.0 pipeline ``load-precomputed --expand-margin-size M ->
inference -> save-precomputed`` would: read the block grown by the crop margin (reflect-padded
past the volume's faces, as chunkflow 2 pads), run 1.2.0's ``Inferencer`` with its CLI defaults
(framework ``universal``, ``wu`` bump, ``mask_output_chunk`` off so the crop margin defaults to
the patch overlap, batch size as given; without the chunk mask 1.2.0 needs the chunk size or
``--patch-num``, so the grown block size is passed), and write the cropped result to a float32 precomputed
volume. Prints one JSON line: seconds (wall, CPU), patches computed, blocks.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


ADAPTER = '''
"""chunkflow 1.2.0 'universal' model file: the network of {net!r}, output multiplied by the patch mask."""
import importlib.util

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("net", {net!r})
_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_net)


class PatchInferencer:
    def __init__(self, weight_path, output_patch_mask):
        self.model = _net.build_model()
        self.model.load_state_dict(torch.load(weight_path, weights_only=True, map_location="cpu"))
        self.model.eval()
        self.mask = torch.from_numpy(np.asarray(output_patch_mask, dtype=np.float32).copy())
        self.patches = 0

    def __call__(self, input_patch):
        self.patches += input_patch.shape[0]
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(input_patch)))
            out *= self.mask
        return out.numpy()
'''


REQUIRED = ("input", "output", "net", "weights", "adapter", "patch", "overlap", "block")


def _zyx(value, key: str) -> tuple[int, int, int]:
    """``[16, 128, 128]`` or ``"16,128,128"`` as a tuple of three ints."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        zyx = tuple(int(v) for v in parts)
    except (TypeError, ValueError):
        zyx = ()
    if len(zyx) != 3:
        raise SystemExit(f"cf12_driver: {key} {value!r} is not three integers z,y,x")
    return zyx  # type: ignore[return-value]


def parse_options(argv: list[str]) -> dict:
    """The one JSON argument (see the module's docstring), checked; ``-h``/``--help`` prints the docstring."""
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} JSON (one argument; see --help)")
    try:
        options = json.loads(argv[1])
    except json.JSONDecodeError as err:
        raise SystemExit(f"cf12_driver: the argument is not JSON: {err}") from None
    if not isinstance(options, dict):
        raise SystemExit("cf12_driver: the argument must be a JSON object")
    missing = [k for k in REQUIRED if k not in options]
    unknown = sorted(set(options) - set(REQUIRED) - {"batch"})
    if missing or unknown:
        raise SystemExit(f"cf12_driver: missing keys {missing}, unknown keys {unknown}")
    for key in ("patch", "overlap", "block"):
        options[key] = _zyx(options[key], key)
    options["batch"] = int(options.get("batch", 1))
    return options


def main() -> None:
    args = parse_options(sys.argv)

    from cloudvolume import CloudVolume
    # chunkflow 1.2.0's own modules (this runs in its venv, with -P): not this repository's chunkflow
    from chunkflow.chunk import Chunk
    from chunkflow.flow.divid_conquer.inferencer import Inferencer
    import chunkflow.__version__ as cfv

    patch, overlap, block = args["patch"], args["overlap"], args["block"]
    with open(args["adapter"], "w") as f:
        f.write(ADAPTER.format(net=args["net"]))

    src = CloudVolume(args["input"], mip=0, fill_missing=False, progress=False)
    size = tuple(int(v) for v in src.info["scales"][0]["size"])[::-1]  # z, y, x
    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="float32", encoding="raw",
                                       resolution=src.info["scales"][0]["resolution"], voxel_offset=[0, 0, 0],
                                       volume_size=list(size[::-1]), chunk_size=[64, 64, 16])
    dst = CloudVolume(args["output"], info=info, compress=False, progress=False)
    dst.commit_info()

    torch.set_grad_enabled(False)
    start_wall, start_cpu = time.perf_counter(), _cpu()
    inferencer = Inferencer(args["adapter"], args["weights"], input_patch_size=patch, output_patch_size=None,
                            num_input_channels=1, num_output_channels=1, output_patch_overlap=overlap,
                            output_crop_margin=None, framework="universal", batch_size=args["batch"], bump="wu",
                            mask_output_chunk=False, dtype="float32",
                            input_size=tuple(b + 2 * m for b, m in zip(block, overlap)))
    blocks = 0
    for z in range(0, size[0], block[0]):
        for y in range(0, size[1], block[1]):
            for x in range(0, size[2], block[2]):
                lo = (z, y, x)
                hi = tuple(min(a + b, s) for a, b, s in zip(lo, block, size))
                glo = tuple(a - m for a, m in zip(lo, overlap))
                ghi = tuple(a + m for a, m in zip(hi, overlap))
                ilo = tuple(max(a, 0) for a in glo)
                ihi = tuple(min(a, s) for a, s in zip(ghi, size))
                raw = np.asarray(src[ilo[2]:ihi[2], ilo[1]:ihi[1], ilo[0]:ihi[0]])[..., 0].transpose(2, 1, 0)
                pad = [(i - g, h - j) for g, i, j, h in zip(glo, ilo, ihi, ghi)]
                image = np.pad(raw, pad, mode="reflect")  # ZYX: 1.2.0 checks alignment on the first three axes
                out = inferencer(Chunk(image, voxel_offset=glo))
                array = np.asarray(out.array, dtype=np.float32)
                dst[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = array[0].transpose(2, 1, 0)[..., None]
                blocks += 1
    wall, cpu = time.perf_counter() - start_wall, _cpu() - start_cpu
    patches = inferencer.patch_inferencer.patch_inferencer.patches
    print(json.dumps({"version": cfv.version, "wall": wall, "cpu": cpu, "patches": patches, "blocks": blocks}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
