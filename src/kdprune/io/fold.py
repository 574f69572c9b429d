"""BatchNorm folding for inference: ``y = BN(conv(x))`` becomes one conv with rescaled weights and a
bias, the BN replaced by ``nn.Identity``.

Conv -> BN pairs are found on a torch.fx trace of the model: a BN qualifies when its only input is
the output of one conv call and that output has no other user (otherwise the other user would see
the folded, rescaled activation). Models that torch.fx cannot trace (data-dependent control flow)
are paired from the autograd graph of one forward pass on an example input instead (the caller's,
or one shaped like the input a pruned model's structure log recorded), and the folded copy is then
checked against the original on that input.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from kdprune.engine.structure import get_structure
from kdprune.utils.forward import flat_tensors

__all__ = ["fold_bn", "find_conv_bn_pairs", "FOLDED_ATTR"]

#: Attribute set on a folded model: the ``(conv, bn)`` module names that were folded.
FOLDED_ATTR = "kdprune_folded_bn"
_CONVS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_BN = nn.modules.batchnorm._BatchNorm


def _foldable_types(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain (not transposed) conv and a BN of matching rank and width, with running stats."""
    want = _CONVS.get(type(conv))
    if want is None or not isinstance(bn, _BN) or bn.running_mean is None:
        return False
    if type(bn) is not want and not isinstance(bn, nn.SyncBatchNorm):
        return False
    if isinstance(conv.weight, nn.parameter.UninitializedParameter) or parametrize.is_parametrized(conv):
        return False  # lazy or reparametrised weights: there is no plain tensor to rescale
    return bn.num_features == conv.out_channels and not (_has_hooks(conv) or _has_hooks(bn))


def _has_hooks(m: nn.Module) -> bool:
    # fx does not see hooks; folding would move the BN's effect past a hook or drop the hook.
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None))


class _PairTracer(fx.Tracer):
    """Traces through modules that hold convs or BNs; any other module is one opaque call (it has
    nothing to fold, and its call still counts as a user of its inputs). That keeps parameter-free
    helpers fx cannot trace (a channel-padding shortcut, a routed reshape) from failing the trace."""

    def __init__(self) -> None:
        super().__init__()
        self._holds: dict[int, bool] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Convs, BNs and modules with neither inside are leaves; torch's own rule otherwise."""
        if isinstance(m, (nn.modules.conv._ConvNd, _BN)):
            return True
        if id(m) not in self._holds:
            self._holds[id(m)] = any(isinstance(c, (nn.modules.conv._ConvNd, _BN)) for c in m.modules())
        return not self._holds[id(m)] or super().is_leaf_module(m, module_qualified_name)


def _pairs_from_fx(graph: fx.Graph, model: nn.Module) -> list[tuple[str, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if calls[src.target] == 1 and calls[node.target] == 1 and _foldable_types(conv, bn):
            pairs.append((src.target, node.target))
    return pairs


def _use_counts(roots: list[Any]) -> Counter:
    """How many autograd edges point at each node (a node's users), over the graph below roots."""
    counts: Counter = Counter()
    seen, stack = set(), list(roots)
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                counts[id(nxt)] += 1
                stack.append(nxt)
    return counts


def _pairs_from_autograd(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    produced: dict[int, list[str]] = {}
    consumed: dict[str, list[int]] = {}
    keep: list[Any] = []  # holds every recorded grad_fn alive, so no id() is reused during the scan

    def node_id(t: Any) -> int:
        fn = getattr(t, "grad_fn", None)
        keep.append(fn)
        return id(fn) if fn is not None else -len(keep)  # no graph node: matches nothing

    hooks = []
    for name, m in model.named_modules():
        if type(m) in _CONVS:
            hooks.append(m.register_forward_hook(
                lambda _m, _i, o, n=name: produced.setdefault(node_id(o), []).append(n)))
        elif isinstance(m, _BN):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, i, n=name: consumed.setdefault(n, []).append(node_id(i[0]))))
    try:
        with torch.enable_grad():
            out = model(example.detach().clone().requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
    roots = [t.grad_fn for t in flat_tensors(out) if t.grad_fn is not None]
    uses, root_ids = _use_counts(roots), {id(r) for r in roots}
    calls = Counter(n for names in produced.values() for n in names)
    pairs = []
    for bn_name, fns in consumed.items():
        convs = produced.get(fns[0], [])
        if len(fns) != 1 or len(convs) != 1 or calls[convs[0]] != 1:
            continue
        if uses[fns[0]] == 1 and fns[0] not in root_ids:
            conv, bn = model.get_submodule(convs[0]), model.get_submodule(bn_name)
            if _foldable_types(conv, bn):
                pairs.append((convs[0], bn_name))
    return pairs


def _recorded_example(model: nn.Module) -> torch.Tensor | None:
    """A seeded input of the shape a pruned model's structure log recorded (None if it has none)."""
    log = get_structure(model)
    if log is None or not log.input_shape:
        return None
    return torch.randn(*log.input_shape, generator=torch.Generator().manual_seed(0))


def _find_pairs(model: nn.Module, example_input: torch.Tensor | None) -> tuple[list[tuple[str, str]], bool]:
    """(pairs, whether they came from the autograd fallback rather than an exact fx graph)."""
    try:
        graph = _PairTracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError... on dynamic code
        example_input = example_input if example_input is not None else _recorded_example(model)
        if example_input is None:
            raise ValueError(f"fold_bn: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); pass example_input= so the "
                             "conv -> BN pairs are read from a forward pass instead") from None
        was_training = model.training
        try:
            return _pairs_from_autograd(model.eval(), example_input), True
        finally:
            model.train(was_training)
    return _pairs_from_fx(graph, model), False


def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where the BN reads only that conv's output (foldable pairs)."""
    return _find_pairs(model, example_input)[0]


@torch.no_grad()
def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    """Rescale ``conv`` in place so that it computes ``bn(conv(x))`` (BN in eval mode)."""
    dtype = conv.weight.dtype
    # float64 so the folded weights round once, not at every step of the algebra
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.copy_((conv.weight.double() * scale.view(shape)).to(dtype))
    new_bias = ((bias - mean) * scale + beta).to(dtype=dtype, device=conv.weight.device)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _check_equal(orig: nn.Module, folded: nn.Module, x: torch.Tensor, tol: float = 1e-4) -> None:
    was_training = orig.training
    try:
        with torch.no_grad():
            a, b = list(flat_tensors(orig.eval()(x))), list(flat_tensors(folded(x)))
    finally:
        orig.train(was_training)
    for ta, tb in zip(a, b):
        diff = (ta - tb).abs().max().item() if ta.numel() else 0.0
        if not diff <= tol * max(1.0, ta.abs().max().item()):
            raise ValueError(f"fold_bn: the folded {type(orig).__name__} differs from the original by "
                             f"{diff:.3g} on the example input: the model reads a conv output outside "
                             "autograd (a mask, a comparison); fold it by hand or export with fold_bn=False")


def fold_bn(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode deep copy of ``model`` with each BN that only reads one conv folded into it."""
    folded = copy.deepcopy(model).eval()
    pairs, by_autograd = _find_pairs(folded, example_input)
    for conv_name, bn_name in pairs:
        _fold_pair(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
        _replace(folded, bn_name, nn.Identity())
    object.__setattr__(folded, FOLDED_ATTR, [*getattr(model, FOLDED_ATTR, []), *pairs])
    if by_autograd:  # autograd cannot see non-differentiable uses of a conv output: check the result
        _check_equal(model, folded, example_input if example_input is not None else _recorded_example(model))
    return folded
