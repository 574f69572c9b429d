"""Recipe dispatch: each method module registers how to run its recipe type."""
from __future__ import annotations

from functools import singledispatch
from typing import Any

from torch import nn


@singledispatch
def run_recipe(recipe: Any, model: nn.Module, ctx: Any) -> tuple[nn.Module, dict]:
    """Run `recipe` on `model` (a private copy) and return (compressed model, method info)."""
    raise TypeError(f"{type(recipe).__name__} is not a kdprune recipe; see kdprune.recipes")
