"""Inference backends for latency: the same model run as eager torch, channels-last eager,
TorchScript (traced and frozen) or ONNX Runtime (CPU, the same thread count as torch).

A backend turns a model into a *binder*: given an input batch it returns the zero-argument call
that is timed, so input conversion (memory format, numpy) happens outside the timed region.
"""
from __future__ import annotations

import copy
import enum
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdprune.registry import check_choice
from kdprune.utils.onnxrt import INPUT_NAME, onnx_available, ort_session, to_onnx

__all__ = ["Backend", "available_backends", "bind_backend"]

Binder = Callable[[torch.Tensor], Callable[[], Any]]


class Backend(enum.Enum):
    """Where a latency measurement runs (the value is the CLI's ``--backend`` name)."""

    EAGER = "eager"
    CHANNELS_LAST = "channels-last"
    TORCHSCRIPT = "torchscript"  # torch.jit.trace + torch.jit.freeze (which also folds BN)
    ONNXRUNTIME = "onnxruntime"  # torch's ONNX export, onnxruntime CPU provider, all graph optimisations


def available_backends() -> tuple[Backend, ...]:
    """Every backend this install can run (ONNXRUNTIME needs onnx, onnxscript and onnxruntime)."""
    return tuple(b for b in Backend if b is not Backend.ONNXRUNTIME or onnx_available())


def _eager(model: nn.Module) -> Binder:
    return lambda x: (lambda: model(x))


def _channels_last(model: nn.Module) -> Binder:
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def bind(x: torch.Tensor) -> Callable[[], Any]:
        xc = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        return lambda: m(xc)
    return bind


def _torchscript(model: nn.Module, example: torch.Tensor) -> Binder:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript, still in use
        ts = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
    return lambda x: (lambda: ts(x))


def _onnxruntime(model: nn.Module, example: torch.Tensor, threads: int | None) -> Binder:
    with tempfile.TemporaryDirectory(prefix="kdprune-ort-") as tmp:
        path = to_onnx(copy.deepcopy(model).eval(), example, Path(tmp) / "model.onnx")
        session = ort_session(path, threads)  # reads the file now: the folder may go afterwards

    def bind(x: torch.Tensor) -> Callable[[], Any]:
        feed = {INPUT_NAME: x.detach().cpu().numpy()}
        return lambda: session.run(None, feed)
    return bind


def bind_backend(model: nn.Module, backend: Backend, input_size: tuple[int, ...],
                 threads: int | None = None) -> Binder:
    """A binder running the eval-mode ``model`` on ``backend`` (CPU); ``input_size`` excludes the batch."""
    check_choice(backend, Backend, "backend")
    if backend is Backend.EAGER:
        return _eager(model)
    if backend is Backend.CHANNELS_LAST:
        return _channels_last(model)
    # traced at batch 2: torch.export (under the ONNX exporter) fixes size-1 dimensions
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    if backend is Backend.TORCHSCRIPT:
        return _torchscript(model, example)
    return _onnxruntime(model, example, threads)
