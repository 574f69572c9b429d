"""Knowledge distillation: KD losses, frozen teachers, feature hints and training tasks.

Layering: this package depends only on torch, ``kdprune.utils`` and ``kdprune.registry``; it
never imports the pruning engine (``kdprune.engine``) or ``kdprune.methods``.
"""
from kdprune.distill.features import FeatureTap, HintLoss
from kdprune.distill.losses import (
    MeanKL,
    MeanProb,
    TeacherMode,
    ensemble_probs,
    kd_loss,
    kd_objective,
    multi_teacher_kd_loss,
    soft_targets,
)
from kdprune.distill.tasks import CETask, HintKDTask, KDTask, Task
from kdprune.distill.teachers import (
    EnsembleTeacher,
    FrozenTeacher,
    is_frozen_teacher_module,
    unwrap_teacher,
)

__all__ = [
    "TeacherMode",
    "MeanKL",
    "MeanProb",
    "kd_loss",
    "multi_teacher_kd_loss",
    "soft_targets",
    "ensemble_probs",
    "kd_objective",
    "FrozenTeacher",
    "EnsembleTeacher",
    "is_frozen_teacher_module",
    "unwrap_teacher",
    "FeatureTap",
    "HintLoss",
    "Task",
    "CETask",
    "KDTask",
    "HintKDTask",
]
