"""Image files whose header promises far more than their body holds: what a decompression bomb
looks like to a reader that trusts the header. Small on disk and in memory to write; a reader that
decompressed them would fail on the missing data (truncated), so being refused as too large proves
the header was checked first."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

PNG_GREY, PNG_RGB, PNG_PALETTE = 0, 2, 3  # PNG colour types (PNG specification, IHDR)


def nifti_header_only(path: Path, shape: tuple[int, ...], dtype: type = np.int16) -> Path:
    """A .nii or .nii.gz whose header says `shape` x `dtype` and whose body is 64 zero bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as fh:
        header.write_to(fh)  # 348 bytes, then the 4-byte extension flag up to vox_offset 352
        fh.write(b"\0" * (4 + 64))
    return path


def png_header_only(path: Path, width: int, height: int, colour_type: int = PNG_GREY, bit_depth: int = 8) -> Path:
    """A PNG of `width` x `height` (IHDR) whose image data (IDAT) is a few compressed zero bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    plte = chunk(b"PLTE", bytes(range(6))) if colour_type == PNG_PALETTE else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path
