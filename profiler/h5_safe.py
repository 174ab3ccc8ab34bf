"""Bounded, closed access to HDF5 files that may be hostile: what the profile reader uses instead of trusting h5py.

A profile's seal proves the file is the one a writer sealed, not that the writer was this project. A validly sealed
file can still declare a terabyte-sized dataset, keep its data in another file (external storage, virtual datasets,
external links), point a soft link anywhere, use a filter that loads a plugin, or inflate a small gzip stream into
gigabytes. Every check here runs on metadata before any data is read, and data is decompressed here (zlib, with a
bound on the output) rather than by HDF5's filter pipeline, so memory stays within what the caller allows.

Every refusal raises `UnsafeHdf5` with a one-line reason; the schema turns it into a `ProfileError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import zlib
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


class UnsafeHdf5(Exception):
    """An HDF5 object outside what the caller's schema allows, or beyond its size limits (one-line message)."""


@dataclass(frozen=True)
class Limits:
    """Size limits for one file: total declared data bytes, and the file's own size (offsets must lie inside it)."""

    file_bytes: int
    data_bytes: int
    max_values: int
    attr_bytes: int
    json_depth: int


def regular_file_size(path: str | os.PathLike) -> int:
    """The size of `path` if it is a regular file (a FIFO, device or folder is refused without opening it)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UnsafeHdf5(f"cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeHdf5("is not a regular file")
    return info.st_size


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of `path`, checked to be a regular file after opening (no blocking on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise UnsafeHdf5(f"cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeHdf5("is not a regular file")
    return fd


def member(group: h5py.Group, name: str, kind: type) -> Any:
    """`group[name]`, refusing anything but a hard link to an object of `kind` (h5py.Group or h5py.Dataset)."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        what = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
        raise UnsafeHdf5(f"{_join(group, name)} is {what}; profiles hold plain objects only")
    found = group[name]
    if type(found) is not kind:
        raise UnsafeHdf5(f"{_join(group, name)} is a {type(found).__name__}, not a {kind.__name__}")
    return found


def members(group: h5py.Group, allowed: set[str] | None = None) -> list[str]:
    """The names in `group`, refusing any outside `allowed` (None: any name; the caller checks each)."""
    names = list(group.keys())
    unknown = sorted(set(names) - allowed) if allowed is not None else []
    if unknown:
        raise UnsafeHdf5(f"{_join(group, unknown[0])} is not part of the schema")
    return names


def _join(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def check_dataset(dataset: h5py.Dataset, dtype: str, ndim: int, limits: Limits) -> int:
    """Refuse a dataset whose storage, dtype, rank or size the schema does not allow; returns its declared bytes."""
    name = dataset.name
    if dataset.is_virtual:
        raise UnsafeHdf5(f"{name} is a virtual dataset (its data lives in other files)")
    if dataset.external:
        raise UnsafeHdf5(f"{name} keeps its data in external files")
    if dataset.dtype != np.dtype(dtype):
        raise UnsafeHdf5(f"{name} has dtype {dataset.dtype}, the schema says {dtype}")
    if len(dataset.shape) != ndim:
        raise UnsafeHdf5(f"{name} has {len(dataset.shape)} dimensions, the schema says {ndim}")
    values = math.prod(dataset.shape)
    if values > limits.max_values:
        raise UnsafeHdf5(f"{name} declares {values} values, more than any profile field ({limits.max_values})")
    nbytes = values * dataset.dtype.itemsize
    if nbytes > limits.data_bytes:
        raise UnsafeHdf5(f"{name} declares {nbytes} bytes, more than this file's size allows ({limits.data_bytes})")
    _check_layout(dataset, nbytes, limits)
    return nbytes


def _check_layout(dataset: h5py.Dataset, nbytes: int, limits: Limits) -> None:
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if layout == h5py.h5d.CHUNKED:
        if filters not in ([], [h5py.h5z.FILTER_DEFLATE]):
            raise UnsafeHdf5(f"{dataset.name} uses HDF5 filters {filters}; profiles use gzip only")
        if any(c > max(s, 1) for c, s in zip(dataset.chunks, dataset.shape)):
            raise UnsafeHdf5(f"{dataset.name} declares chunks {dataset.chunks} larger than its shape")
    elif layout == h5py.h5d.CONTIGUOUS:
        offset = dataset.id.get_offset()
        if nbytes and (offset is None or offset + nbytes > limits.file_bytes):
            raise UnsafeHdf5(f"{dataset.name} declares data beyond the end of the file")
    elif layout != h5py.h5d.COMPACT:
        raise UnsafeHdf5(f"{dataset.name} has a storage layout profiles do not use")


def read_dataset(dataset: h5py.Dataset, limits: Limits) -> np.ndarray:
    """The values of a dataset already passed by `check_dataset`; chunks are inflated here with a bounded output."""
    if dataset.chunks is None:
        return dataset[()]
    itemsize = dataset.dtype.itemsize
    chunk_bytes = math.prod(dataset.chunks) * itemsize
    out = np.empty(dataset.shape, dataset.dtype)
    expected = math.prod(-(-s // c) for s, c in zip(dataset.shape, dataset.chunks))
    count = dataset.id.get_num_chunks()
    if count != expected:
        raise UnsafeHdf5(f"{dataset.name} stores {count} chunks where its shape needs {expected}")
    deflated = dataset.id.get_create_plist().get_nfilters() == 1
    for index in range(count):
        info = dataset.id.get_chunk_info(index)
        region = _chunk_region(dataset, info.chunk_offset)
        if info.byte_offset is None or info.byte_offset + info.size > limits.file_bytes:
            raise UnsafeHdf5(f"{dataset.name} has a chunk beyond the end of the file")
        mask, raw = dataset.id.read_direct_chunk(info.chunk_offset)
        data = _inflate(raw, chunk_bytes, dataset.name) if deflated and not mask & 1 else raw
        if len(data) != chunk_bytes:
            raise UnsafeHdf5(f"{dataset.name} has a chunk of {len(data)} bytes where {chunk_bytes} are declared")
        block = np.frombuffer(data, dataset.dtype).reshape(dataset.chunks)
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def _chunk_region(dataset: h5py.Dataset, offset: tuple[int, ...]) -> tuple[slice, ...]:
    if len(offset) != len(dataset.shape) or any(
        o % c or not 0 <= o < s for o, c, s in zip(offset, dataset.chunks, dataset.shape)
    ):
        raise UnsafeHdf5(f"{dataset.name} has a chunk at {offset}, outside its shape {dataset.shape}")
    return tuple(slice(o, min(o + c, s)) for o, c, s in zip(offset, dataset.chunks, dataset.shape))


def _inflate(raw: bytes, size: int, name: str) -> bytes:
    """Decompress one zlib stream into at most `size` bytes; more output, or a stream that does not end, is refused."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(raw, size)
    except zlib.error as exc:
        raise UnsafeHdf5(f"{name} has a damaged gzip chunk ({exc})") from None
    if not inflater.eof or inflater.unconsumed_tail:
        raise UnsafeHdf5(f"{name} has a gzip chunk that inflates past its declared {size} bytes or is cut short")
    return data


def read_attr(obj: h5py.HLObject, name: str, kind: str, limits: Limits, required: bool = True) -> Any:
    """Attribute `name` of `obj` as a Python value of `kind` ("str", "int", "float", "bool", "ints"), size-checked
    before it is read. A missing optional attribute is None."""
    try:
        attr = h5py.h5a.open(obj.id, name.encode())
    except KeyError:
        if required:
            raise UnsafeHdf5(f"{obj.name} lacks attribute '{name}'") from None
        return None
    shape, dtype = attr.shape, attr.dtype
    string = h5py.check_string_dtype(dtype)
    wanted = {
        "str": shape == () and string is not None,
        "int": shape == () and dtype.kind in "iu",
        "float": shape == () and dtype.kind in "iuf",
        "bool": shape == () and dtype.kind in "biu",
        "ints": len(shape) == 1 and shape[0] <= 16 and dtype.kind in "iu",
    }[kind]
    if not wanted or (string is not None and (string.length or 0) > limits.attr_bytes):
        raise UnsafeHdf5(f"{obj.name} attribute '{name}' has type {dtype}{list(shape)}, not a {kind}")
    buffer = np.empty(shape, dtype)
    attr.read(buffer)
    value = buffer[()]
    if kind == "str":
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if len(text.encode("utf-8", "surrogatepass")) > limits.attr_bytes:
            raise UnsafeHdf5(f"{obj.name} attribute '{name}' is longer than {limits.attr_bytes} bytes")
        return text
    if kind == "ints":
        return [int(v) for v in np.asarray(value)]
    return {"int": int, "float": float, "bool": bool}[kind](value)


def read_json_attr(obj: h5py.HLObject, name: str, limits: Limits) -> Any:
    """A JSON-valued string attribute, refusing documents nested deeper than `limits.json_depth` before parsing."""
    text = read_attr(obj, name, "str", limits)
    if text.count("[") + text.count("{") > limits.json_depth and json_depth(text) > limits.json_depth:
        raise UnsafeHdf5(f"{obj.name} attribute '{name}' nests JSON deeper than {limits.json_depth} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UnsafeHdf5(f"{obj.name} attribute '{name}' is not JSON ({exc})") from None


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    bare = np.frombuffer(_JSON_STRING.sub("", text).encode("ascii", "replace"), np.uint8)
    steps = np.isin(bare, _OPENERS).astype(np.int64) - np.isin(bare, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))
