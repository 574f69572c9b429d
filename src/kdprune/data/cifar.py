"""CIFAR-10/100 python-pickle batches, loaded with a restricted unpickler (never plain pickle.load)."""
from __future__ import annotations

import builtins
import functools
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global outside the CIFAR allow-list (possible code execution)."""


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """Stand-in for _codecs.encode: Python 3 protocol-2 pickles rebuild bytes this way."""
    if encoding.lower().replace("-", "") != "latin1" or not isinstance(obj, str):
        raise ForbiddenGlobalError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


@functools.lru_cache(maxsize=1)
def _safe_globals() -> dict[tuple[str, str], Any]:
    """Every global a CIFAR batch may reference: numpy array rebuilding and inert builtins."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2 layout
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {}
    # Files pickled under numpy 1.x name numpy.core; map both spellings to the real objects.
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode
    # Only plain containers/scalars: builtins like eval, exec, getattr or open are refused.
    for name in ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray",
                 "str", "int", "float", "complex", "bool", "slice", "range"):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals CIFAR batches need and refuses all others."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allow-listed global or raise UnpicklingError naming the refused one."""
        obj = _safe_globals().get((module, name))
        if obj is None:
            raise ForbiddenGlobalError(
                f"refusing to load global {module}.{name}: CIFAR batches only need numpy arrays "
                "and plain containers, so this file is not a genuine CIFAR batch"
            )
        return obj


def load_pickle(path: str | Path) -> Any:
    """Unpickle one CIFAR file with RestrictedUnpickler; failures become DatasetError."""
    path = Path(path)
    data = path.read_bytes()
    try:
        # encoding='bytes' keeps Python 2 str keys/arrays as bytes, as the originals need.
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ForbiddenGlobalError as e:
        raise DatasetError(f"{path}: {e}; delete it and download the CIFAR archive again") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise DatasetError(
            f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e}); "
            "delete it and download the CIFAR archive again"
        ) from e


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(d).__name__}; not a CIFAR batch")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def read_batch(path: str | Path, label_key: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file -> (uint8 images [N,3,32,32], int64 labels [N])."""
    path = Path(path)
    d = _str_keys(load_pickle(path), path)
    if "data" not in d or label_key not in d:
        raise DatasetError(f"{path}: missing 'data' or {label_key!r} entry; not a CIFAR batch")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' is {data.dtype}{list(data.shape)}, expected uint8[N, 3072]")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    # Rows are channel-major planes (1024 R, then G, then B), each 32x32 row-major: NCHW directly.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _read_names(path: Path, key: str, n: int) -> list[str]:
    """Class names from a meta file; numbered names when the file is absent."""
    if not path.is_file():
        return [str(i) for i in range(n)]
    names = _str_keys(load_pickle(path), path).get(key)
    if names is None:
        raise DatasetError(f"{path}: no {key!r} entry in the CIFAR meta file")
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in names]


def find_cifar_dir(root: str | Path, variant: int = 10) -> Path:
    """The extracted CIFAR folder: `root` itself or its cifar-10-batches-py / cifar-100-python child."""
    root = Path(root)
    marker, sub = ("data_batch_1", CIFAR10_DIR) if variant == 10 else ("train", CIFAR100_DIR)
    for cand in (root, root / sub):
        if (cand / marker).is_file():
            return cand
    raise FileNotFoundError(
        f"CIFAR-{variant} not found: no {marker} in {root} or {root / sub}. Download "
        f"https://www.cs.toronto.edu/~kriz/cifar-{variant}-python.tar.gz, extract it, and pass "
        "--data-root / root= (or set KDPRUNE_DATA_ROOT) to the extracted folder or its parent"
    )


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def read_cifar(root: str | Path, variant: int = 10, train: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images [N,3,32,32], int64 labels [N], class names) for one CIFAR split."""
    if variant not in (10, 100):
        raise ValueError(f"CIFAR variant must be 10 or 100, got {variant}")
    d = find_cifar_dir(root, variant)
    if variant == 10:
        files = CIFAR10_TRAIN if train else ("test_batch",)
        label_key, meta, names_key = "labels", d / "batches.meta", "label_names"
    else:
        files = ("train",) if train else ("test",)
        label_key, meta, names_key = "fine_labels", d / "meta", "fine_label_names"
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{variant} in {d} is incomplete: missing {', '.join(missing)}; extract the "
            f"full cifar-{variant}-python.tar.gz archive there"
        )
    images, labels = _concat([read_batch(d / f, label_key) for f in files])
    classes = _read_names(meta, names_key, variant)
    if len(classes) != variant:
        raise DatasetError(f"{meta}: {len(classes)} class names, expected {variant}")
    return images, labels, classes
