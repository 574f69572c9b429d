"""Training: typed configs, the loop (DDP, resume, progress), evaluation, checkpoints."""
from kdprune.training.callbacks import Callback, LoopState, StopTraining
from kdprune.training.carry import CarryOptimizerState, load_named_state, named_optimizer_state, slice_state
from kdprune.training.config import SGD, Adam, AdamW, Anneal, Constant, Cosine, OneCycle, Step, TrainConfig
from kdprune.training.evaluate import evaluate
from kdprune.training.loop import TrainResult, check_input_compat, resolve_device, train
from kdprune.training.params import param_groups
from kdprune.training.runner import TaskModule

__all__ = [
    "Adam", "AdamW", "Anneal", "Callback", "CarryOptimizerState", "Constant", "Cosine", "LoopState", "OneCycle",
    "SGD", "Step", "StopTraining", "TaskModule", "TrainConfig", "TrainResult", "check_input_compat", "evaluate",
    "load_named_state", "named_optimizer_state", "param_groups", "resolve_device", "slice_state",
    "train",
]
