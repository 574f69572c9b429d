"""Residual block discovery for models that do not implement the block protocol.

A residual block is a submodule whose forward computes ``post(branch(p) + shortcut(p))`` with
``p = pre(x)``: ``pre`` a chain of its own submodules, ``shortcut`` one submodule or the identity,
``branch`` any computation of ``p`` that ends in a submodule, ``post`` one submodule, one
activation function of ``POST_FUNCTIONS`` or nothing. Each candidate (a non-container module with
children) is traced with torch.fx, its direct children kept opaque so the block reads in terms of
its own submodules; the reading is then checked numerically on the block's input from the example
forward: the traced block must reproduce the block, and the traced block with the branch output
replaced by zeros must equal ``post(shortcut(pre(x)))``. Only verified blocks are reported, the
innermost where verified blocks nest. Results are ``residual_parts()`` dicts (kdprune.engine.blocks),
with ``"post_fn"`` (a ``POST_FUNCTIONS`` key) added only for a functional post activation."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["POST_FUNCTIONS", "BlockScan", "discover_block", "discover_blocks", "scan_blocks", "branch_end"]

# Stateless activations a block may apply after its sum, by the name the structure log stores.
POST_FUNCTIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
}
_POST_TARGETS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu",
    F.hardswish: "hardswish", torch.sigmoid: "sigmoid", "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid",
}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NO_SUM = "its output is not a sum of a shortcut and a branch (nor one module or activation of one)"


@dataclass
class BlockScan:
    """Discovery result: verified blocks (name -> parts) and, per rejected candidate, why."""

    found: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def why_none(self, model: nn.Module) -> str:
        """A sentence saying why the model has no removable residual block."""
        told = [f"{n}: {r}" for n, r in self.rejected.items() if r != _NO_SUM][:5]
        more = f" ({'; '.join(told)})" if told else ""
        return (f"{type(model).__name__} has no removable residual block: no submodule adds a shortcut "
                f"to a branch{more}")


@dataclass
class _Reading:
    """One way to read a sum as shortcut + branch."""

    parts: dict[str, Any]
    add: fx.Node
    branch: fx.Node
    branch_params: int


class _ChildTracer(fx.Tracer):
    """Keeps the block's direct children opaque: a block is read in terms of its own submodules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Direct children, and whatever torch.fx keeps opaque anyway, are single graph nodes."""
        return "." not in module_qualified_name or super().is_leaf_module(m, module_qualified_name)


def _trace(block: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.GraphModule(block, _ChildTracer().trace(block))
    except Exception:  # noqa: BLE001 -- untraceable user code just is not a candidate
        return None


def _is_add(node: Any) -> bool:
    if not isinstance(node, fx.Node) or len(node.args) != 2:
        return False
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _post_fn(node: fx.Node) -> str | None:
    if node.op not in ("call_function", "call_method") or len(node.args) != 1:
        return None
    if set(node.kwargs) - {"inplace"}:
        return None
    try:
        return _POST_TARGETS.get(node.target)
    except TypeError:  # an unhashable target is no activation of ours
        return None


def _tail(ret: Any) -> tuple[fx.Node, dict[str, Any]] | None:
    """The sum the block returns and what follows it: (add node, {"post", "post_fn"})."""
    if _is_add(ret):
        return ret, {"post": None}
    if not isinstance(ret, fx.Node) or len(ret.args) != 1 or not _is_add(ret.args[0]):
        return None
    if ret.op == "call_module" and not ret.kwargs and "." not in ret.target:
        return ret.args[0], {"post": ret.target}
    fn = _post_fn(ret)
    return (ret.args[0], {"post": None, "post_fn": fn}) if fn else None


def _chain(node: fx.Node) -> list[fx.Node] | None:
    """The single-input submodule calls leading from the block input to ``node`` (input first),
    or None when ``node`` is not reached that way."""
    chain = []
    while node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
            and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    return chain[::-1] if node.op == "placeholder" else None


def _branch(end: fx.Node, points: list[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Nodes computing ``end`` back to the shortcut chain, and the chain points they read."""
    seen: set[fx.Node] = set()
    touched: set[fx.Node] = set()
    stack = [end]
    while stack:
        n = stack.pop()
        if n in points:
            touched.add(n)
        elif n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen, touched


def _params(gm: fx.GraphModule, nodes: Any) -> int:
    ps = {id(p): p for n in nodes if n.op == "call_module" for p in gm.get_submodule(n.target).parameters()}
    return sum(p.numel() for p in ps.values())


def _reading(gm: fx.GraphModule, add: fx.Node, sc: fx.Node, end: fx.Node, tail: dict[str, Any]
             ) -> _Reading | None:
    """``sc`` as the shortcut operand and ``end`` as the branch's, when the protocol can say it."""
    chain = _chain(sc)
    if chain is None or end.op != "call_module":
        return None  # a branch not ending in a submodule is scaled or gated: no mask site, no removal
    points = [next(iter(gm.graph.find_nodes(op="placeholder"))), *chain]
    nodes, touched = _branch(end, points)
    if len(touched) != 1 or not any(n.op == "call_module" for n in nodes):
        return None
    j = points.index(next(iter(touched)))
    pre, rest = chain[:j], chain[j:]
    if len(rest) > 1 or any("." in n.target for n in chain):
        return None  # the protocol names one shortcut module and direct children only
    parts = {"pre": [n.target for n in pre], "shortcut": rest[0].target if rest else None, **tail}
    return _Reading(parts, add, end, _params(gm, nodes))


def _read(gm: fx.GraphModule) -> tuple[_Reading | None, str]:
    """The block's unique reading as shortcut + branch, or None and why not."""
    holders = list(gm.graph.find_nodes(op="placeholder"))
    if len(holders) != 1:
        return None, "it takes more than one input"
    ret = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    found = _tail(ret)
    if found is None:
        return None, _NO_SUM
    add, tail = found
    if add.kwargs and dict(add.kwargs) != {"alpha": 1}:
        return None, f"its sum scales an operand ({dict(add.kwargs)}): a scaled residual"
    if len(add.users) != 1:
        return None, "its sum is also used elsewhere in the block"
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None, "its sum adds a constant"
    reads = [r for r in (_reading(gm, add, a, b, tail), _reading(gm, add, b, a, tail)) if r is not None]
    if not reads:
        return None, ("its sum is not a chain of submodules (or the input) plus a branch ending in "
                      "a submodule (a scaled, gated or functional shortcut or branch)")
    reads.sort(key=lambda r: -r.branch_params)
    if len(reads) == 2 and reads[0].branch_params == reads[1].branch_params:
        return None, "either operand of its sum could be the shortcut"
    return reads[0], ""


def _close(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))


def _kept(block: nn.Module, parts: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """post(shortcut(pre(x))): what ShortcutOnly computes (kdprune.engine.blocks)."""
    for n in [*parts["pre"], parts["shortcut"], parts["post"]]:
        if n is not None:
            x = getattr(block, n)(x)
    fn = parts.get("post_fn")
    return POST_FUNCTIONS[fn]()(x) if fn else x


def _verified(block: nn.Module, gm: fx.GraphModule, r: _Reading, x: torch.Tensor) -> bool:
    """The trace reproduces the block, and with its branch zeroed equals the kept modules."""
    with torch.no_grad():
        if not _close(gm(x.clone()), block(x.clone())):
            return False  # the trace missed something (control flow, randomness)
        with gm.graph.inserting_after(r.branch):
            zero = gm.graph.call_function(torch.zeros_like, (r.branch,))
        r.add.replace_input_with(r.branch, zero)
        gm.recompile()
        return _close(gm(x.clone()), _kept(block, r.parts, x.clone()))


def _inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's (single tensor) input on its first call in ``model(x)``, cloned before
    the module runs (an in-place block would change it)."""
    got: dict[str, torch.Tensor] = {}

    def grab(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            if name not in got and len(args) == 1 and isinstance(args[0], torch.Tensor):
                got[name] = args[0].detach().clone()
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(grab(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _check_reading(block: nn.Module, x: torch.Tensor | None) -> tuple[_Reading | None, str]:
    """The block's verified reading, or None and why not (model in eval mode already)."""
    if x is None:
        return None, "it did not run with one tensor input on the example input"
    gm = _trace(block)
    if gm is None:
        return None, "torch.fx cannot trace it"
    r, why = _read(gm)
    if r is None:
        return None, why
    if not _verified(block, gm, r, x):
        return None, "with its branch zeroed it does not equal its shortcut (numerical check)"
    return r, ""


def _check(block: nn.Module, x: torch.Tensor | None) -> tuple[dict[str, Any] | None, str]:
    """The block's verified parts, or None and why not (model in eval mode already)."""
    r, why = _check_reading(block, x)
    return (r.parts if r is not None else None), why


def _candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if n and not isinstance(m, _CONTAINERS) and next(m.children(), None) is not None]


def _in_eval(model: nn.Module, fn: Any) -> Any:
    was = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was)


def scan_blocks(model: nn.Module, example_input: torch.Tensor) -> BlockScan:
    """Discover the model's residual blocks: verified ones (innermost where they nest) and, for
    every other candidate submodule, why it is not one."""
    def run() -> BlockScan:
        names = _candidates(model)
        xs, scan = _inputs(model, names, example_input), BlockScan()
        for n in names:
            parts, why = _check(model.get_submodule(n), xs.get(n))
            if parts is None:
                scan.rejected[n] = why
            else:
                scan.found[n] = parts
        # Nested verified blocks: keep the inner ones, so a block list never holds a block and one
        # inside it (removing the outer would take the inner with it).
        outer = [n for n in scan.found if any(m.startswith(n + ".") for m in scan.found)]
        for n in outer:
            scan.rejected[n] = "it holds a smaller residual block"
            del scan.found[n]
        return scan
    return _in_eval(model, run)


def discover_blocks(model: nn.Module, example_input: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Residual blocks found by tracing, name -> residual_parts dict, in module order ({} if none)."""
    return scan_blocks(model, example_input).found


def branch_end(model: nn.Module, name: str, example_input: torch.Tensor) -> str:
    """FQN of the submodule whose output is block ``name``'s residual branch (where a scalar block
    mask multiplies, OED), verified like discovery (ValueError saying why there is none)."""
    try:
        block = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from None
    r, why = _in_eval(model, lambda: _check_reading(block, _inputs(model, [name], example_input).get(name)))
    if r is None:
        raise ValueError(f"{name} ({type(block).__name__}) has no maskable residual branch: {why}")
    return f"{name}.{r.branch.target}"


def discover_block(model: nn.Module, name: str, example_input: torch.Tensor) -> dict[str, Any]:
    """The parts of submodule ``name`` read as a residual block (ValueError saying why it is not)."""
    try:
        block = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from None
    parts, why = _in_eval(model, lambda: _check(block, _inputs(model, [name], example_input).get(name)))
    if parts is None:
        raise ValueError(f"{name} ({type(block).__name__}) is not a removable residual block: {why}")
    return parts
