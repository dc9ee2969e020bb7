"""Byte views without copies: how KV bytes are seen by tiers, sockets and shared memory alike.

A chunk's bytes travel as a flat ``uint8`` tensor or a flat byte ``memoryview`` of it; these helpers make
those views of tensors and buffers without copying, and keep the common case (already flat bytes) free of
new view objects, since they run once per chunk on every data path.
"""

from __future__ import annotations

import warnings
from typing import Any, Union

import torch

from kvstrata.errors import InvalidArgumentError

__all__ = ["BufferLike", "as_byte_tensor", "byte_view", "consume", "flat_bytes", "flat_view"]

#: What a put accepts: a contiguous torch tensor (any dtype, CPU or device) or any object with the buffer
#: protocol (bytes, bytearray, memoryview, numpy array).
BufferLike = Union[torch.Tensor, bytes, bytearray, memoryview, Any]


def as_byte_tensor(data: BufferLike) -> torch.Tensor:
    """View ``data`` as a flat uint8 tensor without copying (a tensor must be contiguous)."""
    if isinstance(data, torch.Tensor):
        if not data.is_contiguous():
            raise InvalidArgumentError("chunk data must be a contiguous tensor")
        if data.dtype is torch.uint8 and data.dim() == 1:
            return data  # already flat bytes (reshape + view cost microseconds per chunk)
        return data.reshape(-1).view(torch.uint8)
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise InvalidArgumentError(
            f"chunk data must be a tensor or a buffer, not {type(data).__name__}"
        ) from exc
    if not view.contiguous:
        raise InvalidArgumentError("chunk data must be a contiguous buffer")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    view = view.cast("B")
    if view.readonly:
        # torch.frombuffer warns on read-only buffers but only reads from them here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as a 1-D uint8 tensor (itself when it already is one)."""
    if tensor.dtype is torch.uint8 and tensor.dim() == 1:
        return tensor
    return tensor.reshape(-1).view(torch.uint8)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat, writable memoryview of a contiguous CPU tensor's bytes (no copy)."""
    if tensor.dtype is torch.uint8 and tensor.dim() == 1 and tensor.is_contiguous():
        flat = tensor  # the common case, without reshape/view (microseconds per chunk)
    else:
        flat = tensor.reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return memoryview(flat.numpy())  # type: ignore[arg-type]  # 1-D uint8: already format "B"


def flat_view(part: Any) -> memoryview:
    """``part`` as a flat byte memoryview (one already flat, as chunk views are, as is)."""
    if type(part) is memoryview and part.ndim == 1 and part.itemsize == 1:
        return part
    return memoryview(part).cast("B")


def consume(views: list[memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes of ``views`` (after a partial ``sendmsg``)."""
    while sent:
        head = views[0]
        if sent >= len(head):
            sent -= len(head)
            views.pop(0)
        else:
            views[0] = head[sent:]
            sent = 0
