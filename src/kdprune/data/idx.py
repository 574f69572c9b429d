"""Reader for the IDX format used by MNIST and Fashion-MNIST (gzipped or raw)."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

# IDX type code -> big-endian numpy dtype (the format stores every multi-byte value big-endian).
IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_FIX = (
    "delete it and download / reinstall the data set again "
    "(Fashion-MNIST on Debian: `apt-get install --reinstall dataset-fashion-mnist`)"
)


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, transparently gunzipped when the name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as e:
        # EOFError: truncated stream; BadGzipFile (an OSError) / zlib.error: corrupt bytes or CRC.
        raise DatasetError(f"{path}: truncated or corrupt gzip file ({e}); {_FIX}") from e


def _parse_header(data: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate the magic number; return (dtype, dims, header length in bytes)."""
    if len(data) < 4:
        raise DatasetError(f"{path}: only {len(data)} bytes, too short for an IDX header; {_FIX}")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 + type code in "
            f"{sorted(hex(c) for c in IDX_DTYPES)} + rank); not an IDX file or corrupt; {_FIX}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: file ends inside the IDX header ({ndim} dims); {_FIX}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.dtype(IDX_DTYPES[code]), dims, header


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (raw or .gz) into a tensor of its native dtype and shape."""
    path = Path(path)
    data = _read_bytes(path)
    dtype, dims, header = _parse_header(data, path)
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{path}: size {len(data)} bytes does not match its IDX header "
            f"(dims {dims}, {dtype.itemsize}-byte values -> {expected} bytes); "
            f"the file is truncated or corrupt; {_FIX}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # astype to native byte order also copies, so the tensor owns writable memory.
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, tensor: torch.Tensor | np.ndarray) -> Path:
    """Write a tensor as an IDX file (gzipped when the name ends in .gz); used by tests and tools."""
    path = Path(path)
    arr = tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    code = next((c for c, dt in IDX_DTYPES.items() if np.dtype(dt).kind == arr.dtype.kind
                 and np.dtype(dt).itemsize == arr.dtype.itemsize), None)
    if code is None:
        raise ValueError(f"dtype {arr.dtype} has no IDX type code")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + arr.astype(IDX_DTYPES[code], copy=False).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path
