"""ONNX helpers shared by latency backends (metrics) and export (io): a dynamic-batch ONNX export
through torch's exporter, and an onnxruntime CPU session with a fixed thread count.

onnx, onnxruntime and onnxscript are optional: they are imported only when these are called.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "onnx_available", "ort_session", "to_onnx"]

#: The opset torch's exporter emits natively (lower ones go through a version converter).
DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# torch's exporter logs one warning per torchvision op it cannot register: noise for CNN users.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


def onnx_available() -> bool:
    """True when onnx, onnxscript (torch's exporter needs it) and onnxruntime all import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: `pip install -c constraints.txt onnx onnxruntime "
                          f"onnxscript` (or the package's [export] extra)") from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not the user's
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (as is: callers pass an eval-mode copy) to ``path`` with a dynamic batch axis."""
    for mod in ("onnx", "onnxscript"):
        _require(mod)
    path = Path(path)
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    return path


def ort_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession on a file or serialised model; ``threads`` intra-op
    threads (default: torch's current count, so both runtimes are timed alike), one inter-op."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
