"""Pruning engine: DepGraph channel groups, importance, allocation, width policies, the budget service
(FLOPs/params/latency targets over any family of edits), physical removal, soft masks and the structure log. Never
imports kdprune.distill/methods."""
from kdprune.engine.allocate import (MODES, Allocation, AnyAllocation, Global, MinWidth, PruningPlan, Shaped, Uniform,
                                     WidthFloor, floor_of, plan_pruning, round_width)
from kdprune.engine.graph import (
    BARRIER_ATTR,
    TRACE_TIMEOUT_S,
    TraceTimeout,
    ChannelGroup,
    barrier_pruners,
    Member,
    Part,
    build_graph,
    classifier_layers,
    find_barriers,
    tp_group,
)
from kdprune.engine.links import GroupStatus
from kdprune.engine.groups import EXACT_OPS, channel_groups, group_table, inexact_groups
from kdprune.engine.blocks import RemoveBlock, ShortcutOnly, checked_parts, residual_blocks, residual_parts
from kdprune.engine.discover import POST_FUNCTIONS, BlockScan, branch_end, discover_block, discover_blocks, scan_blocks
from kdprune.engine.blockmask import BlockMaskHooks, attach_block_masks, fold_block_masks, mask_sites
from kdprune.engine.decompose import DecomposedConv, RankCost, decomposed_convs, decomposition_cost, merge_is_cheaper
from kdprune.engine.describe import LayerCoverage, coverage_summary, describe
from kdprune.engine.importance import IMPORTANCE, L1, L2, BNScale, Criterion, Random, Taylor, importance_scores
from kdprune.engine.masks import (MaskKind, MaskSet, MaskSlots, attach_masks, fold_gates_into_bn, masks_to_plan,
                                  zero_channels)
from kdprune.engine.prune import MaskedModelError, apply_channel_edits, apply_plan, prune_channels_edit
from kdprune.engine.gated import GatedCut, GroupsChangedError, prune_gated
from kdprune.engine.structure import (
    EDIT_OPS,
    FORMAT_VERSION,
    STRUCTURE_ATTR,
    StructureLog,
    apply_edit,
    get_structure,
    record_edit,
    register_edit,
    extend,
    replay,
)
from kdprune.engine.budget import (
    LATENCY_REFITS,
    LATENCY_TOLERANCE,
    TOLERANCE,
    Bisection,
    BudgetError,
    BudgetFit,
    BudgetMeter,
    LatencyCheck,
    LatencyError,
    Measured,
    Refine,
    bisect_budget,
    fit_budget,
    plan_key,
    refine_budget,
    search_budget,
    verify_latency,
)
from kdprune.engine.widths import (WIDTH_POLICIES, FreeWidths, LegalSteps, MeasuredWidths, RoundTo, WidthPolicy,
                                   fast_widths, measured_widths, snap_plan)
from kdprune.engine.target import PruneReport, Target, prune_to_target
from kdprune.engine.adaptive import (AdaptiveBN, Candidate, Selection, adaptive_bn_score, candidate_allocations,
                                     select_allocation, shape_of)
from kdprune.engine.recalibrate import (Recalibrate, RecalibrationReport, affected_norms, batch_norms,
                                        recalibrate_norms)

__all__ = [
    "MODES", "Allocation", "Global", "PruningPlan", "Uniform", "plan_pruning", "round_width", "MinWidth", "WidthFloor",
    "floor_of",
    "BARRIER_ATTR", "EXACT_OPS", "inexact_groups",
    "ChannelGroup", "Member", "Part", "build_graph", "channel_groups", "group_table", "GroupStatus",
    "classifier_layers",
    "find_barriers", "tp_group", "barrier_pruners", "TRACE_TIMEOUT_S", "TraceTimeout",
    "IMPORTANCE", "L1", "L2", "BNScale", "Criterion", "Random", "Taylor", "importance_scores",
    "LayerCoverage", "coverage_summary", "describe",
    "RemoveBlock", "ShortcutOnly", "checked_parts", "residual_blocks", "residual_parts",
    "POST_FUNCTIONS", "BlockScan", "branch_end", "discover_block", "discover_blocks", "scan_blocks",
    "BlockMaskHooks", "attach_block_masks", "fold_block_masks", "mask_sites",
    "DecomposedConv", "RankCost", "decomposed_convs", "decomposition_cost", "merge_is_cheaper",
    "MaskKind", "MaskSet", "MaskSlots", "attach_masks", "fold_gates_into_bn", "masks_to_plan", "zero_channels",
    "MaskedModelError", "apply_channel_edits", "apply_plan", "prune_channels_edit", "GroupsChangedError",
    "GatedCut", "prune_gated",
    "EDIT_OPS", "FORMAT_VERSION", "STRUCTURE_ATTR", "StructureLog", "apply_edit", "get_structure",
    "record_edit", "register_edit", "replay", "extend",
    "PruneReport", "Target", "prune_to_target",
    "TOLERANCE", "Bisection", "BudgetError", "BudgetFit", "BudgetMeter", "Measured", "Refine",
    "bisect_budget", "fit_budget", "plan_key", "refine_budget", "search_budget",
    "LATENCY_REFITS", "LATENCY_TOLERANCE", "LatencyCheck", "LatencyError", "verify_latency",
    "WIDTH_POLICIES", "FreeWidths", "LegalSteps", "MeasuredWidths", "RoundTo", "WidthPolicy", "fast_widths",
    "measured_widths", "snap_plan",
    "AdaptiveBN", "Candidate", "adaptive_bn_score", "Selection", "candidate_allocations", "select_allocation",
    "shape_of", "Shaped",
    "AnyAllocation",
    "Recalibrate", "RecalibrationReport", "affected_norms", "batch_norms", "recalibrate_norms",
]
