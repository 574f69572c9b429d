"""Typed training configs: optimizers, schedules and the TrainConfig that holds them."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Union

from kdprune.registry import check_choice, choice


@choice("sgd")
@dataclass(frozen=True)
class SGD:
    """SGD with momentum (the CIFAR-ResNet default)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@choice("adam")
@dataclass(frozen=True)
class Adam:
    """Adam (L2 weight decay added to the gradient)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@choice("adamw")
@dataclass(frozen=True)
class AdamW:
    """AdamW (decoupled weight decay)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2


@choice("constant")
@dataclass(frozen=True)
class Constant:
    """Constant learning rate, with optional linear warm-up."""

    warmup_epochs: float = 0.0


@choice("step")
@dataclass(frozen=True)
class Step:
    """Multiply the LR by `gamma` at each milestone, given as fractions of the run."""

    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@choice("cosine")
@dataclass(frozen=True)
class Cosine:
    """Cosine decay to `min_lr` over the run, per batch, with optional linear warm-up."""

    min_lr: float = 0.0
    warmup_epochs: float = 0.0


class Anneal(str, enum.Enum):
    """OneCycle's annealing curve; the value is torch's ``anneal_strategy`` (a str Enum, so run
    records written as JSON keep the plain name)."""

    COS = "cos"
    LINEAR = "linear"


@choice("onecycle")
@dataclass(frozen=True)
class OneCycle:
    """torch.optim.lr_scheduler.OneCycleLR, stepped per batch; `max_lr` None = optimizer lr."""

    max_lr: float | None = None
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal_strategy: Anneal = Anneal.COS

    def __post_init__(self) -> None:
        check_choice(self.anneal_strategy, Anneal, "OneCycle.anneal_strategy")


OptimizerConfig = Union[SGD, Adam, AdamW]
ScheduleConfig = Union[Constant, Step, Cosine, OneCycle]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the model, the data and the task."""

    epochs: int = 15
    batch_size: int = 128  # global: split evenly over torchrun ranks
    eval_batch_size: int = 512
    optimizer: OptimizerConfig = field(default_factory=SGD)
    schedule: ScheduleConfig = field(default_factory=Cosine)
    label_smoothing: float = 0.0
    augment: bool = True
    grad_clip: float | None = None
    # Weight decay on 1-D/0-D parameters too (BN affine, biases, gates, masks). Off by default:
    # see kdprune.training.params; True gives plain PyTorch's single parameter group.
    weight_decay_1d: bool = False
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    max_steps_per_epoch: int | None = None  # cap for smoke runs and demos
    eval_every: int = 1
    progress: bool = True
    label: str = ""  # names the stage in progress bars and epoch lines (e.g. "kesi round 2/5")
    # A stage that continues an earlier one on another model (SDAP's fine-tune after removing the
    # masked channels): epochs [start_epoch, start_epoch + epochs) of a schedule_epochs-long run,
    # so the LR schedule and the data order go on where the earlier stage stopped.
    start_epoch: int = 0
    schedule_epochs: int | None = None  # None: start_epoch + epochs

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.start_epoch < 0 or self.start_epoch + self.epochs > self.total_epochs():
            raise ValueError(f"TrainConfig: epochs {self.start_epoch}..{self.start_epoch + self.epochs} "
                             f"do not fit in schedule_epochs={self.schedule_epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("TrainConfig.batch_size and eval_batch_size must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0, got {self.grad_clip}")

    def total_epochs(self) -> int:
        """Length of the whole run this config is a stage of (what the LR schedule spans)."""
        return self.schedule_epochs if self.schedule_epochs is not None else self.start_epoch + self.epochs

    def window(self, offset: int, epochs: int) -> TrainConfig:
        """Epochs [offset, offset + epochs) of this run as a stage of the same schedule (the LR and
        the data order go on where the previous window stopped; a model edit can come between)."""
        if offset < 0 or offset + epochs > self.epochs:
            raise ValueError(f"TrainConfig.window: epochs {offset}..{offset + epochs} are not within "
                             f"this run's {self.epochs}")
        return replace(self, epochs=epochs, start_epoch=self.start_epoch + offset,
                       schedule_epochs=self.total_epochs())
