"""IDX reader: real-format files (gz and raw, several dtypes/ranks) and corrupt-file errors."""
import gzip
import struct

import numpy as np
import pytest
import torch

from kdprune.data import DatasetError, read_idx
from kdprune.data.idx import write_idx

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding written by hand from the spec: magic, big-endian dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, CODES[arr.dtype.type], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "dtype,shape",
    [(np.uint8, (5, 4, 3)), (np.uint8, (7,)), (np.int8, (2, 3)), (np.int16, (3, 2)),
     (np.int32, (2, 2, 2, 2)), (np.float32, (4,)), (np.float64, (2, 3))],
)
def test_roundtrip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    t = read_idx(path)
    assert t.shape == shape
    assert t.dtype == torch.from_numpy(arr).dtype
    assert np.array_equal(t.numpy(), arr)


def test_write_idx_matches_spec(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5
    assert write_idx(tmp_path / "a", arr).read_bytes() == idx_bytes(arr)
    assert gzip.decompress(write_idx(tmp_path / "a.gz", arr).read_bytes()) == idx_bytes(arr)


def test_truncated_gzip(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (50, 8, 8), dtype=np.uint8)
    blob = gzip.compress(idx_bytes(arr))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt gzip") as e:
        read_idx(path)
    assert str(path) in str(e.value) and "download" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    with pytest.raises(DatasetError, match=str(path)):
        read_idx(path)


def test_wrong_size(tmp_path):
    arr = np.zeros((10, 2, 2), dtype=np.uint8)
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(arr)[:-10])
    with pytest.raises(DatasetError, match="does not match its IDX header") as e:
        read_idx(path)
    assert str(path) in str(e.value)
    path.write_bytes(idx_bytes(arr) + b"\x00")  # trailing bytes are corruption too
    with pytest.raises(DatasetError):
        read_idx(path)


def test_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetError, match="too short"):
        read_idx(path)
