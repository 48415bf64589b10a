"""Versioned binary layout of one stored KV block. Never pickle: a header, then raw bytes.

Header (little-endian): magic b"MVKV", version u16, dtype u8, group u8, ndim u8, shape u32×ndim,
token start u64, token end u64, payload length u64, 64-bit checksum of the payload
(`checksum.checksum64`, cheaper than moving the bytes). A value that is truncated, foreign or
fails its checksum is refused with `CorruptBlockError`; the caller
counts it, deletes the key and recomputes (a miss, never a wrong answer).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from maverick_serve.kvtier.checksum import checksum64

MAGIC = b"MVKV"
VERSION = 2  # 2: 64-bit checksum instead of CRC-32
# 3, 4: vLLM's fp8 KV cache (kv_cache_dtype fp8 / fp8_e5m2) on GPUs.
_DTYPES = {
    0: torch.float32,
    1: torch.bfloat16,
    2: torch.float16,
    3: torch.float8_e4m3fn,
    4: torch.float8_e5m2,
}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}  # the rest travel as bytes
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
GROUP_CODES = {"global": 0, "chunked": 1}
_FIXED = struct.Struct("<4sHBBB")
_TAIL = struct.Struct("<QQQQ")


class CorruptBlockError(ValueError):
    """A stored value that is not a valid block of ours (truncated, foreign, bit-flipped)."""


@dataclass(frozen=True)
class BlockHeader:
    dtype: torch.dtype
    group: str
    shape: tuple[int, ...]
    start: int
    end: int


def encode_block_parts(tensor: torch.Tensor, group: str, start: int, end: int) -> tuple[bytes, memoryview]:
    """(header, payload) with the payload a view of the tensor's memory: a transport that can
    scatter-gather writes both without ever joining them (no 0.5-20 MB copy per block)."""
    t = tensor.detach().contiguous().cpu()
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"KV dtype {t.dtype} has no block encoding")
    raw = (t if t.dtype in _NUMPY else t.view(torch.uint8)).numpy().data.cast("B")
    head = _FIXED.pack(MAGIC, VERSION, _DTYPE_CODES[t.dtype], GROUP_CODES[group], t.dim())
    dims = struct.pack(f"<{t.dim()}I", *t.shape)
    return head + dims + _TAIL.pack(start, end, raw.nbytes, checksum64(raw)), raw


def encode_block(tensor: torch.Tensor, group: str, start: int, end: int) -> bytes:
    return b"".join(encode_block_parts(tensor, group, start, end))


def decode_block(data: bytes | bytearray) -> tuple[torch.Tensor, BlockHeader]:
    """The tensor is a read-only view over `data` (no copy): copy it before writing to it."""
    if len(data) < _FIXED.size:
        raise CorruptBlockError(f"value of {len(data)} bytes is shorter than a block header")
    magic, version, dtype_code, group_code, ndim = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptBlockError("value under our key is not a maverick-serve KV block (bad magic)")
    if version != VERSION:
        raise CorruptBlockError(f"block layout version {version}; this build reads {VERSION}")
    if dtype_code not in _DTYPES or group_code not in GROUP_CODES.values():
        raise CorruptBlockError("unknown dtype or layer group code")
    offset = _FIXED.size
    dims_size = 4 * ndim
    if len(data) < offset + dims_size + _TAIL.size:
        raise CorruptBlockError("truncated block header")
    shape = struct.unpack_from(f"<{ndim}I", data, offset)
    offset += dims_size
    start, end, length, digest = _TAIL.unpack_from(data, offset)
    offset += _TAIL.size
    payload = memoryview(data)[offset:]
    if payload.nbytes != length:
        raise CorruptBlockError(f"payload is {payload.nbytes} bytes; header says {length} (truncated value)")
    if checksum64(payload) != digest:
        raise CorruptBlockError("checksum mismatch")
    dtype = _DTYPES[dtype_code]
    with warnings.catch_warnings():  # a read-only view is intended: callers copy into the cache
        warnings.simplefilter("ignore", UserWarning)
        if dtype in _NUMPY:
            tensor = torch.from_numpy(np.frombuffer(payload, dtype=_NUMPY[dtype])).reshape(shape)
        else:
            tensor = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8)).view(dtype).reshape(shape)
    group = next(g for g, c in GROUP_CODES.items() if c == group_code)
    return tensor, BlockHeader(dtype, group, tuple(shape), start, end)
