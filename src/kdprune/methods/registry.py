"""Recipe dispatch and naming: each method module registers its recipe type under its CLI name
(``register_recipe``) and how to run it (``run_recipe``); the CLI reads ``RECIPES`` only."""
from __future__ import annotations

from functools import singledispatch
from typing import Any, Callable

from torch import nn

from kdprune.registry import Registry

#: CLI method name -> recipe type, filled by ``register_recipe`` in each method module.
RECIPES: Registry[type] = Registry("method")


def register_recipe(name: str) -> Callable[[type], type]:
    """Class decorator: the recipe type's name for ``kdprune compress --method`` and YAML ``method:``."""
    return RECIPES.register(name)


@singledispatch
def run_recipe(recipe: Any, model: nn.Module, ctx: Any) -> tuple[nn.Module, dict]:
    """Run `recipe` on `model` (a private copy) and return (compressed model, method info)."""
    raise TypeError(f"{type(recipe).__name__} is not a kdprune recipe; see kdprune.recipes")
