"""Bits per byte of general-purpose compressors on the text a model is scored on (DATA.md's baselines), so that a
model's bits per byte always comes with the compressors' on the same bytes."""

from __future__ import annotations

import bz2
import gzip
import lzma

COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, 9, mtime=0),
    "bzip2": lambda data: bz2.compress(data, 9),
    "xz": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def compressor_bits_per_byte(data: bytes) -> dict:
    """`{"gzip_bits_per_byte": ..., "bzip2_bits_per_byte": ..., "xz_bits_per_byte": ...}`: 8 x compressed / raw size
    (gzip -9, bzip2 -9, xz -9e) of `data`."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"data must be non-empty bytes; got {type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}")
    return {f"{name}_bits_per_byte": 8 * len(compress(bytes(data))) / len(data) for name, compress in COMPRESSORS.items()}
