"""What every pruning recipe shares: the target, width rules, the fine-tune config, the context."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdprune.engine import Target
from kdprune.registry import check_choice_fields
from kdprune.training import SGD, Cosine, TrainConfig

RECIPE_VERSION = 1


def default_finetune() -> TrainConfig:
    """Fine-tuning after pruning: 5 epochs of SGD at 0.01 with cosine decay."""
    return TrainConfig(epochs=5, optimizer=SGD(lr=0.01), schedule=Cosine())


#: Key of a recipe's info dict holding other pruned models it produced ({path under out_dir:
#: model}); compress moves them to CompressResult.extras and saves each there.
EXTRA_MODELS = "models"


@dataclass(frozen=True)
class PruneRecipe:
    """Base of the channel-pruning recipes: a FLOPs or params fraction to keep, width rules."""

    target_flops: float | None = None
    target_params: float | None = None
    min_width: int = 1
    round_to: int | None = None
    finetune: TrainConfig = field(default_factory=default_finetune)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        check_choice_fields(self)  # typed choices (mode=Global()...): a name string fails here

    def target(self) -> Target:
        """The engine Target (validates: exactly one fraction in (0, 1))."""
        return Target(flops=self.target_flops, params=self.target_params)


@dataclass
class CompressContext:
    """Data and places a recipe works with; `dense` is an untouched copy of the input model."""

    dense: nn.Module
    train: Any
    val: Any
    example_input: torch.Tensor
    out_dir: Path | None
    resume: bool
    progress: bool
    factory: Callable[[], nn.Module] | None = None  # rebuilds a non-zoo model for save/load

    def stage_dir(self, name: str) -> Path | None:
        """Sub-directory of out_dir for one stage (checkpoints), or None when not saving."""
        return None if self.out_dir is None else self.out_dir / name

    def resumable(self, name: str) -> bool:
        """True when resuming and this stage left a checkpoint behind."""
        d = self.stage_dir(name)
        return self.resume and d is not None and (d / "checkpoint.pt").is_file()

    def with_progress(self, cfg: TrainConfig, label: str = "") -> TrainConfig:
        """The stage's TrainConfig with this run's progress setting and the stage's name for logs."""
        from dataclasses import replace

        return replace(cfg, progress=self.progress and cfg.progress, label=label or cfg.label)
