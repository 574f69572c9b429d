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
