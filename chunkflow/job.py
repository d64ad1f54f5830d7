"""The job manifest: every parameter validated once, hashed, and read by every worker.

A job lives in one object store (the ``--donations`` location)::

    manifest.json          the parameters below; written once when the job is planned
    donations/{key}        stage-one pieces, key = ``{block}%{piece}``
    done/stage{n}/{block}  done markers (a rerun skips a finished task unless forced)
    ...                    the rest of the layout: :mod:`chunkflow.store_layout`

The hash covers everything that changes the numbers in the output (volumes, geometry,
blend, model and its checksum, dtype, padding, precision) and nothing that does not
(device, batch size, compression, where the store itself lives). Every donation carries it, so workers started with other flags, or a
manifest edited after planning, cannot mix their results into this job.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from functools import cached_property

from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.blend import BLEND_MODES
from chunkflow.errors import JobError
from chunkflow.geometry import GeometryError, Layout

log = logging.getLogger(__name__)

OUTPUT_DTYPES = ("float32", "float16", "uint8")
PAD_MODES = ("reflect", "constant")
PRECISIONS = ("float32", "float16", "bfloat16")
DONATION_DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "zstd", "blosc")
SCHEMA_VERSION = 1
#: fields added after jobs were planned without them: left out of the hash at their default value
_DEFAULTS_OUTSIDE_OLD_HASHES = {"fill_missing": False, "mip": 0, "output_compression": "default", "mask": None,
                                "mask_mip": 0, "sharded": False}
_UNHASHED = {"store", "device", "batch_size", "job_hash", "created_by", "donation_compression"}


@dataclass(frozen=True)
class Job:
    input: str
    output: str
    store: str
    bbox: Bbox  # the output region; a name ``x0-x1_y0-y1_z0-z1`` in the manifest (and accepted here)
    input_patch: tuple[int, int, int]
    output_patch: tuple[int, int, int]
    overlap: tuple[int, int, int]
    block: tuple[int, int, int]
    storage_chunk: tuple[int, int, int]
    blend: str
    model: str
    weights: str | None
    model_checksum: str
    in_channels: int
    out_channels: int
    output_dtype: str = "float32"
    pad_mode: str = "reflect"
    precision: str = "float32"
    donation_dtype: str = "float32"
    donation_compression: str = "none"
    device: str = "cpu"
    batch_size: int = 1
    fill_missing: bool = False
    mip: int = 0
    output_compression: str = "default"
    mask: str | None = None
    mask_mip: int = 0
    sharded: bool = False  # the output is sharded: stage two writes whole blocks (Layout.whole_block_writes)
    version: int = SCHEMA_VERSION
    created_by: str = field(default="chunkflow")
    job_hash: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.bbox, str):
            try:
                object.__setattr__(self, "bbox", Bbox.from_name(self.bbox))
            except GeometryError as err:
                raise JobError(f"job bbox: {err}") from None
        elif not isinstance(self.bbox, Bbox):
            raise JobError(f"job bbox {self.bbox!r} is neither a Bbox nor a name x0-x1_y0-y1_z0-z1")
        for name in ("input_patch", "output_patch", "overlap", "block", "storage_chunk"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.job_hash:
            object.__setattr__(self, "job_hash", self.compute_hash())

    # ---- identity ---------------------------------------------------------------------------
    def values(self) -> dict:
        """The manifest's fields as JSON-able values (the bbox as its name)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["bbox"] = self.bbox.name
        return values

    def compute_hash(self) -> str:
        payload = {k: v for k, v in self.values().items() if k not in _UNHASHED}
        for name, default in _DEFAULTS_OUTSIDE_OLD_HASHES.items():
            if payload[name] == default:  # hashes of jobs planned before the field existed still hold
                del payload[name]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.values(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Job":
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            unknown = set(raw) - known
            if unknown:
                raise JobError(f"{where} has unknown fields {sorted(unknown)}: written by a newer chunkflow?")
            job = cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise JobError(f"{where} is not a chunkflow job manifest: {err}") from None
        if job.compute_hash() != job.job_hash:
            raise JobError(f"{where} was changed after planning (hash {job.compute_hash()} != recorded "
                           f"{job.job_hash}); plan a new job instead of editing the manifest")
        return job

    def differences(self, other: "Job", limit: int = 3) -> list[str]:
        """What makes this job's hash differ from ``other``'s, one ``"overlap 4,8,8 here, 4,16,16
        there"`` per field (this job's value first), at most ``limit`` and then how many more."""
        mine, theirs = self.values(), other.values()
        names = [f.name for f in fields(self) if f.name not in _UNHASHED and mine[f.name] != theirs[f.name]]
        shown = [f"{name.replace('_', ' ')} {_shown(mine[name])} here, {_shown(theirs[name])} there"
                 for name in names[:limit]]
        return shown + ([f"and {len(names) - limit} more"] if len(names) > limit else [])

    def at(self, store: str) -> "Job":
        """The same job read from ``store`` (the store's location is not part of the hash, so a
        copied or remounted store keeps working: workers use where they found the manifest)."""
        values = self.values()
        values["store"] = store
        return Job(**values)

    def with_runtime(self, device: str | None = None, batch_size: int | None = None) -> "Job":
        """The same job with other runtime settings (these never change the output)."""
        values = self.values()
        if device is not None:
            values["device"] = device
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise JobError(f"--batch-size {batch_size!r} must be a positive integer")
            values["batch_size"] = batch_size
        return Job(**values)

    # ---- derived geometry -------------------------------------------------------------------
    @cached_property
    def layout(self) -> Layout:
        return Layout(self.bbox, Vec(self.output_patch), Vec(self.overlap), Vec(self.block),
                      Vec(self.storage_chunk), whole_block_writes=self.sharded)

    @property
    def context_margin(self) -> Vec:
        return (Vec(self.input_patch) - Vec(self.output_patch)) // 2


def _shown(value: object) -> str:
    """A manifest value as a user writes it: ZYX sizes as ``4,16,16``."""
    if isinstance(value, tuple):
        return zyx_text(value)
    return "none" if value is None else str(value)


def refuse_fraction_overlap(value, patch: Vec) -> None:
    """Refuse (GeometryError) an overlap given as a fraction of the patch, as MONAI takes it, naming the
    overlap in voxels that MONAI's fraction means for ``patch`` (the output patch)."""
    items = value if isinstance(value, (tuple, list)) else [value]
    if not any(isinstance(v, float) for v in items):
        return
    fractions = list(items) * 3 if len(items) == 1 else list(items)
    hint = ""
    if len(fractions) == 3 and all(isinstance(f, (int, float)) and 0 <= f < 1 for f in fractions):
        voxels = [p - int(p * (1 - f)) for p, f in zip(patch, fractions)]
        hint = (f" (MONAI's overlap {','.join(str(f) for f in fractions)} of this patch is "
                f"{','.join(str(v) for v in voxels)})")
    raise GeometryError(f"overlap {value!r} is in voxels, z,y,x integers such as 4,16,16, not a fraction{hint}")


def validate_parameters(input_patch: Vec, output_patch: Vec, blend: str, output_dtype: str, pad_mode: str,
                        precision: str) -> None:
    """Checks that need no data; geometry checks live in ``Layout``."""
    names = ("z", "y", "x")
    for a in range(3):
        if input_patch[a] <= 0 or output_patch[a] <= 0:
            raise JobError(f"patch sizes must be positive: input {zyx_text(input_patch)}, output {zyx_text(output_patch)}")
        if output_patch[a] > input_patch[a]:
            raise JobError(f"output patch {zyx_text(output_patch)} is larger than the input patch "
                           f"{zyx_text(input_patch)} along {names[a]}")
        if (input_patch[a] - output_patch[a]) % 2:
            raise JobError(f"output patch {zyx_text(output_patch)} is not centred in the input patch "
                           f"{zyx_text(input_patch)} along {names[a]}: their difference must be even")
    for label, value, valid in (("blend mode", blend, BLEND_MODES), ("output dtype", output_dtype, OUTPUT_DTYPES),
                                ("pad mode", pad_mode, PAD_MODES), ("precision", precision, PRECISIONS)):
        if value not in valid:
            raise JobError(f"{label} {value!r} is not one of {', '.join(valid)}")


def default_storage_chunk(block: Vec, target: Vec = Vec(16, 64, 64)) -> Vec:
    """The largest divisor of each block side that is at most ``target`` (small chunks keep
    the stage-two band thin; dividing the block keeps every block write aligned)."""
    if any(b <= 0 for b in block):
        raise GeometryError(f"block size {zyx_text(block)} must be positive along every axis")

    def best(b: int, t: int) -> int:
        return max(d for d in range(1, min(b, t) + 1) if b % d == 0)
    return Vec(best(b, t) for b, t in zip(block, target))
