"""The recipe types `kp.compress` accepts (frozen dataclasses, dispatched by type)."""
from kdprune.methods.baselines import GroupNorm, KDFinetune, L1Finetune
from kdprune.methods.base import PruneRecipe
from kdprune.methods.sdap import SDAP
from kdprune.methods.kesi import KESI, KESIPFEC
from kdprune.methods.oed import OED
from kdprune.methods.cascade import Cascade
from kdprune.methods.edp import EDP
from kdprune.methods.peers import TPGroupNorm, TPMagnitude

__all__ = ["GroupNorm", "KDFinetune", "L1Finetune", "PruneRecipe"]
__all__ += ["KESI", "KESIPFEC"]
__all__ += ["SDAP"]
__all__ += ["OED"]
__all__ += ["Cascade"]
__all__ += ["EDP"]
__all__ += ["TPGroupNorm", "TPMagnitude"]
