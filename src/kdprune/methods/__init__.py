"""Compression methods: one module per recipe; `compress` dispatches on the recipe's type."""
from kdprune.methods.base import CompressContext, PruneRecipe
from kdprune.methods.baselines import GroupNorm, KDFinetune, L1Finetune
from kdprune.methods.kesi import KESI, KESIPFEC
from kdprune.methods.compress import CompressResult, compress, infer_example_input, measure, report_markdown
from kdprune.methods.registry import run_recipe
from kdprune.methods.sdap import SDAP
from kdprune.methods.oed import OED
from kdprune.methods.cascade import Cascade
from kdprune.methods.edp import EDP
from kdprune.methods.peers import TPGroupNorm, TPMagnitude

__all__ = ["CompressContext", "CompressResult", "GroupNorm", "KDFinetune", "L1Finetune", "PruneRecipe",
           "compress", "infer_example_input", "measure", "report_markdown", "run_recipe"]
__all__ += ["KESI", "KESIPFEC"]
__all__ += ["SDAP"]
__all__ += ["OED"]
__all__ += ["Cascade"]
__all__ += ["EDP"]
__all__ += ["TPGroupNorm", "TPMagnitude"]
