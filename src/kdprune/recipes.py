"""The recipe types `kp.compress` accepts (frozen dataclasses, dispatched by type)."""
from kdprune.methods.baselines import GroupNorm, KDFinetune, L1Finetune
from kdprune.methods.base import PruneRecipe

__all__ = ["GroupNorm", "KDFinetune", "L1Finetune", "PruneRecipe"]
