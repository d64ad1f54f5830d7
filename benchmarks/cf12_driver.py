"""Runs chunkflow 1.2.0's chunk inference over the blocks of a volume (inside its own venv).

Invoked by ``bench_vs_chunkflow12.py`` as ``/tmp/cf12venv/bin/python -P cf12_driver.py ARGS``
(``-P`` keeps this repository's chunkflow off ``sys.path``, so ``import chunkflow`` is 1.2.0).

What it does per block, as a 1.2.0 pipeline ``load-precomputed --expand-margin-size M ->
inference -> save-precomputed`` would: read the block grown by the crop margin (reflect-padded
past the volume's faces, as chunkflow 2 pads), run 1.2.0's ``Inferencer`` with its CLI defaults
(framework ``universal``, ``wu`` bump, ``mask_output_chunk`` off so the crop margin defaults to
the patch overlap, batch size as given; without the chunk mask 1.2.0 needs the chunk size or
``--patch-num``, so the grown block size is passed), and write the cropped result to a float32 precomputed
volume. Prints one JSON line: seconds (wall, CPU), patches computed, blocks.
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="precomputed input (file://...)")
    ap.add_argument("--output", required=True, help="precomputed float32 output to create (file://...)")
    ap.add_argument("--net", required=True, help="a .py file defining build_model() (only torch needed)")
    ap.add_argument("--weights", required=True, help="state dict of the net")
    ap.add_argument("--adapter", required=True, help="where to write the 1.2.0 model file")
    ap.add_argument("--patch", required=True)
    ap.add_argument("--overlap", required=True)
    ap.add_argument("--block", required=True)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()

    from cloudvolume import CloudVolume
    from chunkflow.chunk import Chunk
    from chunkflow.flow.divid_conquer.inferencer import Inferencer
    import chunkflow.__version__ as cfv

    patch = tuple(int(v) for v in args.patch.split(","))
    overlap = tuple(int(v) for v in args.overlap.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    with open(args.adapter, "w") as f:
        f.write(ADAPTER.format(net=args.net))

    src = CloudVolume(args.input, mip=0, fill_missing=False, progress=False)
    size = tuple(int(v) for v in src.info["scales"][0]["size"])[::-1]  # z, y, x
    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="float32", encoding="raw",
                                       resolution=src.info["scales"][0]["resolution"], voxel_offset=[0, 0, 0],
                                       volume_size=list(size[::-1]), chunk_size=[64, 64, 16])
    dst = CloudVolume(args.output, info=info, compress=False, progress=False)
    dst.commit_info()

    torch.set_grad_enabled(False)
    start_wall, start_cpu = time.perf_counter(), _cpu()
    inferencer = Inferencer(args.adapter, args.weights, input_patch_size=patch, output_patch_size=None,
                            num_input_channels=1, num_output_channels=1, output_patch_overlap=overlap,
                            output_crop_margin=None, framework="universal", batch_size=args.batch, bump="wu",
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
