"""Coverage before a long run: which convs/linears a pruning plan can narrow, and why the others
stay whole (classifier output, an ignored layer, a channel barrier, a grouped conv, not traced)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from kdprune.engine.graph import build_graph
from kdprune.engine.groups import group_table

__all__ = ["LayerCoverage", "describe", "coverage_summary"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class LayerCoverage:
    """One conv/linear: may its output channels be pruned (``prunable``), in which group, else why not."""

    name: str
    type: str
    out_channels: int
    groups: int
    prunable: bool
    group: str | None  # root of the channel group its output channels belong to
    reason: str


def _group_status(model: nn.Module, x: torch.Tensor, ignored_layers) -> tuple[dict[str, tuple[str, str | None]], set]:
    """layer name -> (group root, blocker or None) for every output-channel member of every group
    (linked groups included, see ``kdprune.engine.links``)."""
    dg = build_graph(model, x)
    status: dict[str, tuple[str, str | None]] = {}
    for row in group_table(model, x, ignored_layers, dg=dg, root_types=_LAYERS):
        for m in row.group.members:
            if m.role == "out" and m.name not in status:
                status[m.name] = (row.group.root, row.blocker)
    names = {m: n for n, m in model.named_modules()}
    traced = {names[m] for m in dg.module2node if m in names}
    return status, traced


def describe(model: nn.Module, example_input: torch.Tensor,
             ignored_layers: Sequence[nn.Module | str] = ()) -> list[LayerCoverage]:
    """Per conv/linear of ``model``: prunable or not, and the reason (traced on a copy; the model
    and its BN statistics are untouched)."""
    probe = copy.deepcopy(model).cpu().eval()
    ignored = [n if isinstance(n, str) else next(k for k, v in model.named_modules() if v is n)
               for n in ignored_layers]
    status, traced = _group_status(probe, example_input.detach().cpu(), ignored)
    rows = []
    for name, m in probe.named_modules():
        if not isinstance(m, _LAYERS):
            continue
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        groups = getattr(m, "groups", 1)
        if name not in traced:
            root, why = None, "not on the traced graph (unused for this input)"
        else:
            root, why = status.get(name, (None, "no output-channel group"))
        rows.append(LayerCoverage(name, type(m).__name__, out, groups, why is None, root,
                                  why or ("group root" if root == name else f"in the group of {root}")))
    return rows


def coverage_summary(rows: Sequence[LayerCoverage], shown: int = 4) -> str:
    """One line: how many layers can be narrowed, and why the others stay whole (most common
    reasons first), for errors that must name the real cause of an unreachable target."""
    whole = [r for r in rows if not r.prunable]
    groups = len({r.group for r in rows if r.prunable})
    head = f"{groups} prunable channel groups; {len(whole)} of {len(rows)} conv/linear layers stay whole"
    if not whole:
        return head
    by_reason: dict[str, list[str]] = {}
    for r in whole:
        by_reason.setdefault(r.reason, []).append(r.name)
    ranked = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    parts = [f"{', '.join(names[:2])}{' ...' if len(names) > 2 else ''}: {why}" for why, names in ranked[:shown]]
    more = f"; and {len(ranked) - shown} more reasons (kp.engine.describe lists them)" if len(ranked) > shown else ""
    return f"{head} ({'; '.join(parts)}{more})"
