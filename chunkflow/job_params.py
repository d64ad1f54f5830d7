"""One definition of a job's planning parameters, and the signatures derived from it.

:class:`JobParameters` lists every parameter that ``plan`` validates into a
:class:`chunkflow.job.Job`: its name, type, default and one line of help. The ``plan``, ``run``
and ``reference`` commands, :func:`chunkflow.api.plan` and :func:`chunkflow.planning.plan`
take their job flags from it through :func:`takes_job_parameters`, which builds their signature
(what Fire turns into flags and what ``inspect.signature`` shows) and the ``Args`` section of
their docstring (what ``--help`` and ``help()`` print). A new parameter is one new field here,
plus its use in :func:`chunkflow.planning.make_job`.

Imports nothing heavy: ``import chunkflow`` stays light.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

from chunkflow.errors import UsageError

Size = Union[str, Sequence[int], int]
R = TypeVar("R")


def _param(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A field with its one line of help (``metadata["help"]``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class JobParameters:
    """What a job is planned from: volumes, model, patch grid, blocks, storage, region, mask.

    Sizes are Z,Y,X: three ints, ``"16,64,64"`` or one int for a cube. Nothing is validated here
    (:func:`chunkflow.planning.make_job` does it, writing nothing); a path-like location is
    taken as its string.
    """

    input: str = _param("input volume: file:///path, gs://bucket/path, s3://... (Neuroglancer precomputed) or "
                        "PATH.zarr.")
    output: str = _param("output volume, created if absent (covering the region: --bbox, or the input's bounds at "
                         "--mip).")
    donations: str = _param("the job's store: a local directory or gs://bucket/prefix (manifest, donations, done "
                            "markers).")
    model: str = _param("builtin:membrane, identity, net.py (defines build_model()), net.pt (TorchScript) or "
                        "net.onnx.")
    input_patch: Size = _param("network input patch, ZYX, e.g. 20,256,256.")
    output_patch: Size | None = _param("network output patch (default: the input patch); smaller = the net's "
                                       "context margin.", None)
    overlap: Size = _param("overlap of neighbouring output patches in voxels, ZYX, e.g. 4,32,32.", "0,0,0")
    block: Size | None = _param("block size, ZYX: the unit of output ownership, a multiple of the output's storage "
                                "chunk.", None)
    weights: str | None = _param("optional state-dict file for a .py model (loaded with weights_only=True).", None)
    blend: str = _param("constant, gaussian (MONAI's, sigma_scale 0.125) or bump (original chunkflow's).",
                        "gaussian")
    dtype: str = _param("output dtype: float32, uint8 ([0, 1] scaled to 0..255) or float16 (zarr only).",
                        "float32")
    pad_mode: str = _param("input padding past the volume's faces: reflect or constant (zeros).", "reflect")
    precision: str = _param("float32, or float16/bfloat16 autocast on CUDA (accumulation stays float32).",
                            "float32")
    device: str = _param("cpu, cuda or cuda:N (CUDA_VISIBLE_DEVICES is respected).", "cpu")
    batch_size: int = _param("patches per forward pass.", 1)
    storage_chunk: Size | None = _param("storage chunk of a new output volume, ZYX (default: the largest divisor of "
                                        "the block <= 16,64,64).", None)
    donation_dtype: str = _param("float32 (exact) or float16 (half the bytes; error <= 2^-11 relative per piece).",
                                 "float32")
    compression: str = _param("donation compression: none, zstd or blosc.", "none")
    fill_missing: bool = _param("read input chunks that do not exist as zeros (default: refuse the block, naming "
                                "the chunk).", False)
    bbox: str | None = _param("region to compute, x0-x1_y0-y1_z0-z1 in voxels of --mip (default: the whole input); "
                              "context comes from the input beyond it.", None)
    mip: int = _param("resolution level of the input: precomputed scales[N], OME-Zarr datasets[N] (default 0).", 0)
    output_compression: str = _param("codec of a new output's chunks: default (the format's lossless default), "
                                     "none, and per format gzip, zstd, ... (docs/formats_precomputed.md, "
                                     "docs/formats_zarr.md).", "default")
    mask: str | None = _param("a mask layer (any level of a precomputed or zarr volume): patches whose output box "
                              "is zero there are not computed and count as zeros.", None)
    mask_mip: int = _param("resolution level of the mask layer (default 0).", 0)
    sharded: bool = _param("create the output sharded (precomputed shards, zarr v3 shards) in shards that tile the "
                           "block; stage two then writes whole blocks (docs/design.md, sharded outputs).", False)
    overwrite: bool = _param("write over a region of an existing output that another job wrote (refused without it, "
                             "naming that job).", False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, f.name, os.fspath(value))


JobParameters.__doc__ = (inspect.cleandoc(JobParameters.__doc__) + "\n\nAttributes:\n"
                         + "".join(f"    {f.name}: {f.metadata['help']}\n" for f in dataclasses.fields(JobParameters)))


def field_help(name: str) -> str | None:
    """The one line of help of field ``name`` of :class:`JobParameters` (None if it is not a field)."""
    for f in dataclasses.fields(JobParameters):
        if f.name == name:
            return f.metadata["help"]
    return None


def takes_job_parameters(omit: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                         flags: bool = False) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Turn ``fn(params: JobParameters, *own)`` into ``fn(<every field>, *own)``.

    The returned function takes each field of :class:`JobParameters` as a parameter of its own
    (after ``fn``'s required parameters: the required fields, in field order, then the optional
    fields; then ``fn``'s optional parameters), builds the :class:`JobParameters` from them and
    calls ``fn`` with it. Its docstring is ``fn``'s, with each field's help added to the ``Args``
    section (:func:`with_field_docs`).

    Args:
        omit: the fields the function does not take, each with the value it uses instead.
        defaults: another default for a field it takes (``{"donations": None}``).
        flags: annotate for a command line: a size is given as a string (``"16,64,64"``).

    Returns:
        The decorator.

    Raises:
        TypeError: ``omit`` or ``defaults`` names no field, or a field is in both.
    """
    omit, defaults = dict(omit or {}), dict(defaults or {})
    names = {f.name for f in dataclasses.fields(JobParameters)}
    unknown, both = sorted((set(omit) | set(defaults)) - names), sorted(set(omit) & set(defaults))
    if unknown:
        raise TypeError(f"{', '.join(unknown)}: not fields of JobParameters")
    if both:
        raise TypeError(f"{', '.join(both)}: both omitted and given a default")
    offered = [f for f in dataclasses.fields(JobParameters) if f.name not in omit]

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(fn)
        own = list(signature.parameters.values())[1:]
        job = [_parameter(f, defaults, flags) for f in offered]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        first = [p for p in own if p.default is p.empty and p.kind in positional]
        ordered = (first + [p for p in job if p.default is p.empty] + [p for p in job if p.default is not p.empty]
                   + [p for p in own if p not in first])
        derived = signature.replace(parameters=ordered)
        names = [f.name for f in offered]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            try:
                given = derived.bind(*args, **kwargs)
            except TypeError as err:  # a misspelt or missing argument is the caller's mistake: a Refusal
                raise UsageError(_call_error(fn.__name__, err, kwargs, list(derived.parameters))) from None
            given.apply_defaults()
            values = given.arguments
            params = JobParameters(**{name: values[name] for name in names}, **omit)
            return fn(params, **{p.name: values[p.name] for p in own})

        wrapper.__signature__ = derived
        wrapper.__doc__ = with_field_docs(fn.__doc__ or "", derived)
        return wrapper
    return decorate


def _call_error(name: str, err: TypeError, kwargs: Mapping[str, Any], known: list[str]) -> str:
    """One line for a call that does not fit the signature, naming the closest parameter of a misspelt one."""
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{name}() got an unexpected argument {unknown[0]!r}{hint}; its arguments: {', '.join(known)}"
    return f"{name}(): {err}"


def documented_fields(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` with the help of each of its parameters that is a job parameter in its docstring's
    ``Args`` (:func:`with_field_docs`); for a function that takes some fields by name.

    Args:
        fn: the function; its docstring documents its other parameters.

    Returns:
        ``fn``, its ``__doc__`` completed.
    """
    fn.__doc__ = with_field_docs(fn.__doc__ or "", inspect.signature(fn))
    return fn


def with_field_docs(doc: str, signature: inspect.Signature) -> str:
    """``doc`` (Google style) with an ``Args`` line for every parameter of ``signature``, in its order.

    A parameter documented in ``doc`` keeps its text; a field of :class:`JobParameters` gets its
    help; lines for names the signature lacks are dropped. The ``Args`` section is added after
    the first paragraph if ``doc`` has none.

    Args:
        doc: the docstring as written.
        signature: the parameters to document.

    Returns:
        The cleaned docstring (:func:`inspect.cleandoc`).

    Raises:
        TypeError: a parameter is neither documented in ``doc`` nor a field.
    """
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in lines:
        at = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
        lines[at:at] = ["", "Args:"]
    start = lines.index("Args:")
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    written: dict[str, list[str]] = {}
    for line in lines[start + 1:end]:
        match = re.match(r"^    \*{0,2}(\w+): ", line)
        if match:
            written[match.group(1)] = [line]
        elif written:
            written[list(written)[-1]].append(line)
    section = ["Args:"]
    for name in signature.parameters:
        help_line = field_help(name)
        if name not in written and help_line is None:
            raise TypeError(f"parameter {name} is documented neither in the docstring nor as a job parameter")
        section += written.get(name) or [f"    {name}: {help_line}"]
    return "\n".join(lines[:start] + section + lines[end:]).rstrip() + "\n"


def _parameter(f: dataclasses.Field, defaults: Mapping[str, Any], flags: bool) -> inspect.Parameter:
    """The parameter for field ``f``: its default (or the one in ``defaults``) and its annotation."""
    default = defaults.get(f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
    annotation = str(f.type)
    if flags:
        annotation = re.sub(r"\bSize\b", "str", annotation)
    if default is None and not annotation.endswith("None"):
        annotation += " | None"
    return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
