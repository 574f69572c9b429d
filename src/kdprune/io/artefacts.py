"""Per-format export artefacts: write one (dynamic batch), run it, and read its per-module outputs.

Three formats: ONNX (torch's exporter, run with onnxruntime), TorchScript (``torch.jit.trace``) and
torch.export's ExportedProgram (``torch.export.save``). The probes give, for a module name of the
exported model, the output the artefact computes there, so a parity failure can name the layer
where it starts:

- ONNX: every node carries its module scope (``pkg.torch.onnx.name_scopes``); the last node of a
  module is its output, exposed as an extra graph output.
- ExportedProgram: every node carries ``nn_module_stack``; an fx Interpreter records the last
  node of each module.
- TorchScript: a traced module keeps its submodules; each is run on the input the eager module saw.
"""
from __future__ import annotations

import ast
import enum
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from kdprune.utils.forward import flat_tensors
from kdprune.utils.onnxrt import INPUT_NAME, ort_session, to_onnx

__all__ = ["ExportError", "ExportFormat", "Tap", "write_artefact", "load_runner", "probe_artefact"]

Runner = Callable[[torch.Tensor], list[torch.Tensor]]


class ExportError(ValueError):
    """The exporter could not write the model, or the artefact does not run (e.g. at another batch size)."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (exporters raise pages of context)."""
    return next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:500]


class ExportFormat(enum.Enum):
    """What ``kp.export`` writes (the value is the CLI's ``--format`` name)."""

    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "exported-program"

    @property
    def suffix(self) -> str:
        """The conventional file name ending."""
        return {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}[self.value]


@dataclass(frozen=True)
class Tap:
    """One eager module call: its inputs and output (clones, so later in-place ops do not leak in)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


def _batch_dim() -> Any:
    return torch.export.Dim("batch")


def write_artefact(model: nn.Module, example: torch.Tensor, path: Path, fmt: ExportFormat,
                   opset: int | None) -> list[str]:
    """Write ``model`` (an eval-mode copy) to ``path``; returns the exporter's warnings worth keeping."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        if fmt is ExportFormat.ONNX:
            to_onnx(model, example, path, opset)
        elif fmt is ExportFormat.TORCHSCRIPT:
            # check_trace off: the parity check after export compares on more inputs than it would
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))
        else:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
            torch.export.save(program, str(path))
    return [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def load_runner(path: Path, fmt: ExportFormat, threads: int | None = None) -> Runner:
    """A function running the artefact at ``path`` on a batch, returning its output tensors."""
    if fmt is ExportFormat.ONNX:
        session = ort_session(path, threads)
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: x.numpy()})]
    module = _load_torch(path, fmt)
    return lambda x: flat_tensors(module(x))


def _load_script(path: Path) -> Any:
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; deployment targets still ask for it
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _load_torch(path: Path, fmt: ExportFormat) -> Callable[..., Any]:
    if fmt is ExportFormat.TORCHSCRIPT:
        return _load_script(path)
    return torch.export.load(str(path)).module()


def probe_artefact(path: Path, fmt: ExportFormat, x: torch.Tensor, taps: dict[str, Tap]) -> dict[str, torch.Tensor]:
    """Module name -> the artefact's output for that module (only modules it can attribute)."""
    with torch.no_grad():
        if fmt is ExportFormat.ONNX:
            return _probe_onnx(path, x, set(taps))
        if fmt is ExportFormat.EXPORTED_PROGRAM:
            return _probe_program(path, x)
        return _probe_script(path, taps)


def _onnx_scopes(node: Any) -> list[str]:
    """The module names enclosing an ONNX node (outermost first, root and op name dropped)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes[:-1] if s]
    return []


def _probe_onnx(path: Path, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    last: dict[str, str] = {}
    for node in graph.node:
        for scope in _onnx_scopes(node):
            if scope in wanted and node.output:
                last[scope] = node.output[0]
    info = {v.name: v for v in graph.value_info}
    taken = {o.name for o in graph.output} | {i.name for i in graph.input}
    names = sorted({v for v in last.values() if v not in taken})
    for name in names:
        graph.output.append(info.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session(model.SerializeToString())
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(None, {INPUT_NAME: x.numpy()})))
    return {m: torch.from_numpy(values[v]) for m, v in last.items() if v in values}


class _Recorder(fx.Interpreter):
    """Runs a graph, keeping the last value computed inside each module (``nn_module_stack``)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.last: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        """Run one node; remember its value for every module it sits in."""
        out = super().run_node(n)
        if n.op == "call_function":
            for fqn, _ in (n.meta.get("nn_module_stack") or {}).values():
                if fqn:
                    self.last[fqn] = out
        return out


def _probe_program(path: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    rec = _Recorder(torch.export.load(str(path)).module())
    rec.run(x)
    return {k: v for k, v in rec.last.items() if isinstance(v, torch.Tensor)}


def _clone(a: Any) -> Any:
    return a.clone() if isinstance(a, torch.Tensor) else a


def _probe_script(path: Path, taps: dict[str, Tap]) -> dict[str, torch.Tensor]:
    mods = dict(_load_script(path).named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, tap in taps.items():
        sub = mods.get(name)
        if sub is None:
            continue
        try:  # a submodule the trace never called has no forward method
            y = sub(*[_clone(a) for a in tap.args], **tap.kwargs)
        except (RuntimeError, AttributeError, TypeError):
            continue
        if isinstance(y, torch.Tensor):
            out[name] = y
    return out
