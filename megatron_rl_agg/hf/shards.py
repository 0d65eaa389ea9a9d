"""The safetensors files of a Hugging Face export, planned before any tensor exists (pure: no
torch.distributed, no Megatron).

A plan fixes, from names, shapes and one dtype only, which file holds each tensor and at which byte
offset: the names are sorted and cut greedily into files of at most ``max_shard_bytes`` (a file holds at
least one tensor), ``model.safetensors`` when one file suffices, else ``model-0000i-of-0000N.safetensors``
with ``model.safetensors.index.json``. Each file is the safetensors format (``safetensors.torch.save_file``
with ``metadata={"format": "pt"}``, byte for byte: tests/hf/test_hf_inputs.py compares)::

    [8 bytes: header length n, little-endian u64] [n bytes: JSON header, space-padded to a multiple of 8]
    [the tensors' bytes, in header order (sorted by name), contiguous, little-endian]

The header is ``{"__metadata__": {"format": "pt"}, name: {"dtype", "shape", "data_offsets": [b, e]}, ...}``
in compact JSON. So one process writes the headers (:func:`create_files`, which also sizes each file)
and any process that sees the directory writes any tensor's bytes at its offset (:func:`write_tensor`),
in any order: the pipeline stages of an export write their own layers in parallel.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

__all__ = ["ShardPlan", "plan_shards", "header_bytes", "create_files", "write_tensor", "write_index",
           "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ALIGN = 8


@dataclass(frozen=True)
class ShardPlan:
    """Where every tensor of an export goes (see the module docstring)."""

    dtype: torch.dtype
    files: tuple[str, ...]
    """File names, in order."""
    names: tuple[str, ...]
    """Every tensor name, sorted (the index of a name here is its slot in the export's written counts)."""
    shapes: dict
    """``{name: shape}``."""
    file_of: dict
    """``{name: file name}``."""
    offset_of: dict
    """``{name: absolute byte offset of its data in its file}``."""
    headers: dict
    """``{file name: header bytes (length prefix included)}``."""
    file_bytes: dict
    """``{file name: total size}``."""

    def nbytes(self, name: str) -> int:
        return _numel(self.shapes[name]) * _itemsize(self.dtype)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all files (the index's ``metadata.total_size``)."""
        return sum(self.nbytes(n) for n in self.names)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def header_bytes(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The header (length prefix included) of a safetensors file of ``entries`` ``[(name, shape)]``
    sorted by name, all of ``dtype``, with ``{"format": "pt"}`` metadata."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"export dtype {dtype}; valid: {sorted(str(d) for d in SAFETENSORS_DTYPES)}")
    header: dict = {"__metadata__": {"format": "pt"}}
    begin, size = 0, _itemsize(dtype)
    for name, shape in entries:
        end = begin + _numel(shape) * size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((_ALIGN - len(text) % _ALIGN) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


def plan_shards(shapes: dict, dtype: torch.dtype, max_shard_bytes: int) -> ShardPlan:
    """The plan of tensors ``{name: shape}`` of one ``dtype`` in files of at most ``max_shard_bytes``."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"export dtype {dtype}; valid: {sorted(str(d) for d in SAFETENSORS_DTYPES)}")
    size = _itemsize(dtype)
    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(shapes):
        nbytes = _numel(shapes[name]) * size
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    if len(groups) == 1:
        files = ("model.safetensors",)
    else:
        files = tuple(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups)))
    file_of, offset_of, headers, file_bytes = {}, {}, {}, {}
    for fname, names in zip(files, groups):
        head = header_bytes([(n, tuple(shapes[n])) for n in names], dtype)
        pos = len(head)
        for n in names:
            file_of[n], offset_of[n] = fname, pos
            pos += _numel(shapes[n]) * size
        headers[fname], file_bytes[fname] = head, pos
    return ShardPlan(dtype=dtype, files=files, names=tuple(sorted(shapes)),
                     shapes={n: tuple(int(s) for s in shapes[n]) for n in shapes}, file_of=file_of,
                     offset_of=offset_of, headers=headers, file_bytes=file_bytes)


def create_files(plan: ShardPlan, directory: str) -> None:
    """Write every file's header and size it to its final length (the data bytes are zeros until
    :func:`write_tensor` fills them)."""
    for fname in plan.files:
        with open(os.path.join(directory, fname), "wb") as fh:
            fh.write(plan.headers[fname])
            fh.truncate(plan.file_bytes[fname])


def write_tensor(plan: ShardPlan, directory: str, name: str, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s bytes at its place in its file (created by :func:`create_files`).

    Raises:
        KeyError / ValueError: ``name`` is not in the plan, or its shape or dtype differs from the plan's.
    """
    if name not in plan.file_of:
        raise KeyError(f"tensor {name!r} is not in the export plan (it has {len(plan.names)} tensors, "
                       f"e.g. {list(plan.names[:3])})")
    if tuple(tensor.shape) != plan.shapes[name] or tensor.dtype != plan.dtype:
        raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}; the export plan has "
                         f"{plan.shapes[name]} {plan.dtype}")
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()   # little-endian host bytes
    fd = os.open(os.path.join(directory, plan.file_of[name]), os.O_WRONLY)
    try:
        view, pos = memoryview(data).cast("B"), plan.offset_of[name]
        while view:
            done = os.pwrite(fd, view, pos)
            view, pos = view[done:], pos + done
    finally:
        os.close(fd)


def write_index(plan: ShardPlan, directory: str) -> None:
    """``model.safetensors.index.json`` (only for a plan of several files)."""
    if len(plan.files) == 1:
        return
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": {n: plan.file_of[n] for n in plan.names}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)
