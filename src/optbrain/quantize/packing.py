"""Bit packing of integer codes: ``bits`` bits per code, little-endian, in a uint8 byte stream.

Code i occupies bits ``i·b … i·b + b − 1`` of the stream (bit t of the stream is bit t mod 8 of
byte t div 8); the stream is padded with zero bits to whole bytes. ``n`` codes take
``ceil(n·b / 8)`` bytes: 4-bit codes two per byte, 3-bit codes eight in three bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import MAX_BITS, MIN_BITS

__all__ = ["pack", "packed_bytes", "unpack"]


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, not {bits!r}")


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    return -(-n * bits // 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer ``codes`` (any shape, values in [0, 2^bits)) into a flat uint8 tensor."""
    _check(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed in {bits} bits")
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte
        per = 8 // bits
        pad = (-flat.numel()) % per
        flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (flat << shifts).sum(1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    weights = torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream << weights).sum(1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` codes (uint8, flat) of a stream written by :func:`pack`."""
    _check(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a flat uint8 tensor")
    if packed.numel() < packed_bytes(n, bits):
        raise ValueError(
            f"{packed.numel()} bytes hold fewer than the {n} codes of {bits} bits expected"
        )
    data = packed.to(torch.int32)
    mask = 2**bits - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
        return ((data[:, None] >> shifts) & mask).reshape(-1)[:n].to(torch.uint8)
    stream = (data[:, None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    stream = stream.reshape(-1)[: n * bits].reshape(n, bits)
    weights = torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream << weights).sum(1).to(torch.uint8)
