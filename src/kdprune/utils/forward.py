"""One eval-mode, no-grad forward with temporary forward hooks (to read shapes or outputs)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, Any], None]


def probe_forward(model: nn.Module, x: torch.Tensor, hooks: Mapping[str, Hook]) -> Any:
    """Run ``model(x)`` in eval mode without grad, with ``hooks[name]`` on submodule ``name``;
    the hooks are removed and the train/eval mode restored afterwards, even on error."""
    handles = [model.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for o in items for t in flat_tensors(o)]
