"""Pruning engine: DepGraph channel groups, importance, allocation, FLOPs/params targets,
physical removal, soft masks and the structure log. Never imports kdprune.distill/methods."""
from kdprune.engine.allocate import MODES, PruningPlan, plan_pruning, round_width
from kdprune.engine.graph import (
    BARRIER_ATTR,
    ChannelGroup,
    Member,
    build_graph,
    channel_groups,
    classifier_layers,
    find_barriers,
    tp_group,
)
from kdprune.engine.blocks import RemoveBlock, ShortcutOnly, residual_blocks, residual_parts
from kdprune.engine.describe import LayerCoverage, describe
from kdprune.engine.importance import IMPORTANCE, importance_scores
from kdprune.engine.masks import MaskSet, attach_masks, fold_gates_into_bn, masks_to_plan, zero_channels
from kdprune.engine.prune import MaskedModelError, apply_channel_edits, apply_plan, prune_channels_edit
from kdprune.engine.structure import (
    EDIT_OPS,
    FORMAT_VERSION,
    STRUCTURE_ATTR,
    StructureLog,
    apply_edit,
    get_structure,
    record_edit,
    register_edit,
    replay,
)
from kdprune.engine.target import PruneReport, Target, prune_to_target

__all__ = [
    "MODES", "PruningPlan", "plan_pruning", "round_width",
    "BARRIER_ATTR", "ChannelGroup", "Member", "build_graph", "channel_groups", "classifier_layers",
    "find_barriers", "tp_group",
    "IMPORTANCE", "importance_scores", "LayerCoverage", "describe",
    "RemoveBlock", "ShortcutOnly", "residual_blocks", "residual_parts",
    "MaskSet", "attach_masks", "fold_gates_into_bn", "masks_to_plan", "zero_channels",
    "MaskedModelError", "apply_channel_edits", "apply_plan", "prune_channels_edit",
    "EDIT_OPS", "FORMAT_VERSION", "STRUCTURE_ATTR", "StructureLog", "apply_edit", "get_structure",
    "record_edit", "register_edit", "replay",
    "PruneReport", "Target", "prune_to_target",
]
