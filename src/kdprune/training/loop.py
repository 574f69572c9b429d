"""The training loop: one function, `train`, plus the small pieces it is made of."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from kdprune.data import as_loader
from kdprune.distill.tasks import CETask
from kdprune.training import compute
from kdprune.training.callbacks import Callback, LoopState, StopTraining
from kdprune.training.checkpoint import (
    CHECKPOINT_NAME, CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint,
)
from kdprune.training.config import TrainConfig
from kdprune.training.evaluate import evaluate
from kdprune.training.optim import advance_schedule, build_optimizer, build_schedule
from kdprune.training.params import param_groups
from kdprune.training.runner import TaskModule, task_eval_models, task_owned_parameters, task_trainable_modules, wrap
from kdprune.utils.dist import all_reduce_sum, barrier, dist_info, init_distributed
from kdprune.utils.meta import run_metadata, write_json
from kdprune.utils.seed import seed_everything


@dataclass
class TrainResult:
    """The trained model (unwrapped), per-epoch history and the final validation metrics."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None


def resolve_device(name: str) -> torch.device:
    """'auto' -> this rank's CUDA device when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():  # fail now, not at the first .to() minutes in
        raise ValueError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_info().local_rank)
    return dev


def check_input_compat(model: nn.Module, data: Any) -> None:
    """Fail early, naming both, when the model's input channels or class count do not fit the data's."""
    _check_channels(model, data)
    _check_classes(model, data)


def _data_attr(data: Any, name: str) -> Any:
    value = getattr(data, name, None)
    return getattr(data.dataset, name, None) if value is None and hasattr(data, "dataset") else value


def _check_classes(model: nn.Module, data: Any) -> None:
    try:
        classes = _data_attr(data, "num_classes")
    except (ValueError, IndexError):  # an empty set: the loader says so
        return
    # the head: the model's num_classes, or its last registered layer when that is a Linear (an SE
    # block's Linear mid-network says nothing about the classes)
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    head = owners[-1] if owners and isinstance(owners[-1], nn.Linear) else None
    outputs = getattr(model, "num_classes", None) or (head.out_features if head is not None else None)
    if isinstance(classes, int) and isinstance(outputs, int) and outputs < classes:
        raise ValueError(f"the model has {outputs} outputs but the data has {classes} classes; "
                         f"create the model with num_classes={classes}")


def _check_channels(model: nn.Module, data: Any) -> None:
    model_c = getattr(model, "in_chans", None)
    if model_c is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        model_c = first.in_channels if first is not None else None
    data_c = _data_attr(data, "in_chans")
    if model_c is not None and data_c is not None and model_c != data_c:
        raise ValueError(
            f"model expects in_chans={model_c} but the data has {data_c} channels; "
            f"create the model with in_chans={data_c}"
        )


_RESERVED_TERMS = ("loss", "top1", "images_per_s")


class _EpochMeter:
    """Running sums of loss, accuracy and every named loss term; synced only when read."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        self.terms: dict[str, torch.Tensor] = {}
        self.t0 = time.perf_counter()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, terms: dict) -> None:
        n = y.numel()
        self.sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(float(n), dtype=torch.float64, device=self.sums.device)])
        for k, v in terms.items():
            term = v.detach().double() * n
            if k in self.terms:
                self.terms[k] += term
            else:
                self.terms[k] = term

    def values(self) -> tuple[dict[str, float], float]:
        """This rank's running means and images seen (no all-reduce; one sync): for the bar."""
        keys = list(self.terms)
        vals = torch.cat([self.sums] + [self.terms[k].reshape(1) for k in keys]).tolist()
        loss_sum, correct, seen = vals[:3]
        n = max(seen, 1.0)
        out = {"loss": loss_sum / n, "acc": 100 * correct / n}
        out.update({k: v / n for k, v in zip(keys, vals[3:])})
        return out, seen

    def reduce(self) -> dict[str, float]:
        """All-reduced epoch means, one collective for everything (term keys sorted: same order on every rank)."""
        elapsed = time.perf_counter() - self.t0
        keys = sorted(self.terms)
        flat = torch.cat([self.sums] + [self.terms[k].reshape(1) for k in keys])
        all_reduce_sum(flat)
        vals = flat.tolist()
        loss_sum, correct, n = vals[:3]
        n = max(n, 1.0)
        row = {"train_loss": loss_sum / n, "train_top1": 100.0 * correct / n,
               "train_images_per_s": n / elapsed, "epoch_time_s": elapsed}
        row.update({f"train_{k}": v / n for k, v in zip(keys, vals[3:])})
        return row


def _check_terms(terms: dict, task: Any) -> None:
    bad = [k for k in terms if k in _RESERVED_TERMS]
    if bad:
        raise ValueError(f"{type(task).__name__} returned loss terms named {bad}: "
                         f"{_RESERVED_TERMS} are reserved for the loop's own metrics")


def _step(runner, bundle, opt, sched, cfg, state, callbacks, x, y) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One optimisation step with every hook, in the order documented in callbacks.py."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits, terms = runner(x, y)
        loss = sum(terms.values())
    state.x, state.y, state.outputs, state.terms = x, y, logits, terms
    state.lr = opt.param_groups[0]["lr"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for cb in callbacks:
        cb.on_after_backward(state)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(bundle.parameters(), cfg.grad_clip)
    opt.step()
    state.step += 1
    for cb in callbacks:
        cb.on_optimizer_step(state)
    sched.step()
    for cb in callbacks:
        cb.on_step_end(state)
    return loss, logits, terms


def _train_epoch(runner, bundle, loader, opt, sched, cfg, state, callbacks, device, bar) -> dict[str, float]:
    """One pass over this rank's shard; returns all-reduced loss/accuracy/terms and throughput."""
    runner.train()
    meter = _EpochMeter(device)
    per_image, images = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if i >= state.steps_per_epoch:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if i == 0:  # the first step's ops counted (compute.py): every model the task runs, forward and backward
            (loss, logits, terms), flops = compute.counted(_step, runner, bundle, opt, sched, cfg, state, callbacks,
                                                            x, y)
            per_image = flops / max(1, x.shape[0])
            _check_terms(terms, bundle.task)
        else:
            loss, logits, terms = _step(runner, bundle, opt, sched, cfg, state, callbacks, x, y)
        images += x.shape[0]
        meter.update(loss, logits, y, terms)
        _progress(bar, i, meter, state.lr)
    state.x = state.y = state.outputs = None  # do not keep the last batch's graph alive
    state.terms = {}
    return {**meter.reduce(), "train_flops": per_image * images * dist_info().world_size}


def _progress(bar, i: int, meter: _EpochMeter, lr: float) -> None:
    bar.update(1)
    if bar.disable or (i % 20 != 0):
        return  # .tolist() syncs: only every 20 steps
    vals, seen = meter.values()
    rate = seen / max(time.perf_counter() - meter.t0, 1e-9)
    post = {k: f"{v:.3f}" for k, v in vals.items() if k != "acc"}
    bar.set_postfix(**post, acc=f"{vals['acc']:.1f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")


def _config_record(cfg: TrainConfig, model: nn.Module, task, extra: dict | None) -> dict[str, Any]:
    spec = getattr(model, "kdprune_spec", None)
    return {"train_config": {"type": type(cfg).__name__, **asdict(cfg),
                             "optimizer_type": type(cfg.optimizer).__name__,
                             "schedule_type": type(cfg.schedule).__name__},
            "task": type(task).__name__, "model": spec, **(extra or {}), "meta": run_metadata()}


def _restore(ckpt_path: Path, bundle: TaskModule, opt, sched, callbacks, device) -> tuple[int, int, list]:
    """Load a checkpoint into model, task modules, optimizer, schedule and callbacks; returns
    (epoch, step, history)."""
    ck = load_checkpoint(ckpt_path, map_location=device)
    try:
        bundle.model.load_state_dict(ck["model"])
        bundle.extras.load_state_dict(ck.get("task", {}))
    except (RuntimeError, KeyError) as e:  # another model or task: say so in one line
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model/task "
                              f"({str(e).splitlines()[0][:200]}); resume with the same options") from None
    try:
        opt.load_state_dict(ck["optimizer"])
    except ValueError as e:  # e.g. a checkpoint from before parameter groups, or another task
        raise CheckpointError(f"checkpoint {ckpt_path} does not match this run's optimizer ({e}); "
                           "resume with the same model, task and config, or delete it to start over") from e
    sched.load_state_dict(ck["schedule"])
    for i, cb in enumerate(callbacks):
        cb.load_state_dict(ck["callbacks"][i])
    restore_rng(ck["rng"])
    return ck["epoch"], ck["step"], ck["history"]


def _write_epoch(out: Path, bundle: TaskModule, opt, sched, callbacks, state, history) -> None:
    with open(out / "metrics.jsonl", "w") as f:  # rewritten whole: a resumed run stays consistent
        f.writelines(json.dumps(row) + "\n" for row in history)
    save_checkpoint(out / CHECKPOINT_NAME, {
        "model": bundle.model.state_dict(), "task": bundle.extras.state_dict(),
        "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
        "callbacks": [cb.state_dict() for cb in callbacks], "rng": capture_rng(),
        "epoch": state.epoch, "step": state.step, "history": history,
    })


def _save_final(out: Path, model: nn.Module) -> None:
    if getattr(model, "kdprune_spec", None) is None and getattr(model, "kdprune_factory", None) is None:
        return  # a bare user module: the checkpoint holds its weights
    from kdprune.io import save_pruned

    save_pruned(model, out / "model", factory=getattr(model, "kdprune_factory", None))


def _build_optimizer(bundle: TaskModule, task: Any, callbacks: Sequence[Callback], cfg: TrainConfig):
    """Optimizer over the student and the task's modules, minus what a callback/task owns."""
    owned = task_owned_parameters(task) + [p for cb in callbacks for p in cb.owned_parameters()]
    groups = param_groups({"": bundle.model, **{f"extras.{k}": m for k, m in bundle.extras.items()}},
                          owned=owned, decay_1d=cfg.weight_decay_1d)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad outside the owned ones")
    return build_optimizer(cfg.optimizer, groups)


def _prepare(model: nn.Module, task: Any, cfg: TrainConfig, device: torch.device) -> TaskModule:
    model = model.to(device)
    for m in getattr(task, "modules", lambda: [])():
        m.to(device)
    for m in task_trainable_modules(task).values():
        m.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    call = torch.compile(model) if cfg.compile else model
    return TaskModule(model, task, call)


def _train_loader(train_data: Any, cfg: TrainConfig, world_size: int) -> tuple[Any, int]:
    """This rank's shuffled, augmented loader and the steps per epoch."""
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world_size} ranks")
    loader = as_loader(train_data, cfg.batch_size // world_size, shuffle=True,
                       augment=cfg.augment, drop_last=True, seed=cfg.seed)
    steps = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    if steps == 0:
        raise ValueError(f"no full batch of {cfg.batch_size} in the training data ({len(loader.dataset)} samples)")
    return loader, steps


def train(
    model: nn.Module,
    train_data: Any,
    val_data: Any = None,
    config: TrainConfig | None = None,
    task: Any = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    record: dict[str, Any] | None = None,
    save_model: bool = True,
) -> TrainResult:
    """Train `model` on `train_data` (any kdprune/torch data set or loader); DDP under torchrun.

    `task` (default cross-entropy) turns a batch into named loss terms and may train modules of
    its own (see kdprune.training.runner). With `out_dir`, writes config/metrics/checkpoints there
    and, if `save_model`, the final model (a stage inside a compression method passes False: the
    method saves its own result)."""
    cfg = config or TrainConfig()
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_input_compat(model, train_data)
    task = task if task is not None else CETask(label_smoothing=cfg.label_smoothing)
    seed_everything(cfg.seed)
    bundle = _prepare(model, task, cfg, device)
    loader, steps = _train_loader(train_data, cfg, info.world_size)
    opt = _build_optimizer(bundle, task, callbacks, cfg)
    sched = build_schedule(cfg.schedule, opt, steps, cfg.total_epochs())
    advance_schedule(sched, cfg.start_epoch * steps)
    out = Path(out_dir) if out_dir is not None else None
    state = LoopState(bundle.model, opt, 0, 0, steps, cfg.epochs, task=task)
    history: list[dict[str, float]] = []
    if resume:
        if out is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        state.epoch, state.step, history = _restore(out / CHECKPOINT_NAME, bundle, opt, sched, callbacks, device)
    elif out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", _config_record(cfg, bundle.model, task, record))
    runner = wrap(bundle, device, info.enabled)
    for cb in callbacks:
        cb.on_train_start(state)
    res = _run_epochs(runner, bundle, loader, val_data, opt, sched, cfg, state,
                      callbacks, device, out, history, info.is_main, save_model)
    compute.add(compute.history_flops(res.history))  # restored epochs included: a resumed run counts the same
    return res


def _evaluate_all(bundle: TaskModule, val_data: Any, cfg: TrainConfig, device) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, m in task_eval_models(bundle.task, bundle.model).items():
        prefix = f"val_{name}_" if name else "val_"
        # max_steps_per_epoch caps the per-epoch evaluation too (a smoke run's val set can be large)
        scores = evaluate(m, val_data, cfg.eval_batch_size, device, cfg.bf16, max_batches=cfg.max_steps_per_epoch)
        row.update({prefix + k: v for k, v in scores.items()})
    return row


def _run_epochs(runner, bundle, loader, val_data, opt, sched, cfg, state, callbacks,
                device, out, history, is_main, save_model) -> TrainResult:
    metrics: dict[str, float] = history[-1] if history else {}
    try:
        while state.epoch < cfg.epochs:
            loader.set_epoch(cfg.start_epoch + state.epoch)  # a continuing stage: new orders
            bar = tqdm(total=state.steps_per_epoch, desc=f"{_prefix(cfg)}epoch {state.epoch + 1}/{cfg.epochs}",
                       disable=not (is_main and cfg.progress), mininterval=1.0, leave=False)
            with bar:
                row = _train_epoch(runner, bundle, loader, opt, sched, cfg, state, callbacks, device, bar)
            if val_data is not None and ((state.epoch + 1) % cfg.eval_every == 0 or state.epoch + 1 == cfg.epochs):
                row.update(_evaluate_all(bundle, val_data, cfg, device))
            row = {"epoch": state.epoch + 1, "step": state.step, "lr": opt.param_groups[0]["lr"], **row}
            state.epoch += 1
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            history.append(row)
            metrics = row
            if is_main:
                _log_row(row, cfg)
                if out is not None:
                    _write_epoch(out, bundle, opt, sched, callbacks, state, history)
            barrier()
    except StopTraining:
        pass
    if save_model and out is not None and is_main:
        _save_final(out, bundle.model)
    return TrainResult(model=bundle.model, history=history, metrics=metrics, out_dir=out)


def _prefix(cfg: TrainConfig) -> str:
    return f"{cfg.label}: " if cfg.label else ""


_LOG_KEYS = ("train_loss", "train_top1", "val_loss", "val_top1", "train_images_per_s", "epoch_time_s")


def _log_row(row: dict[str, float], cfg: TrainConfig) -> None:
    if not cfg.progress:
        return
    terms = sorted(k for k in row if k.startswith("train_") and k not in _LOG_KEYS)
    keys = _LOG_KEYS[:2] + tuple(terms) + _LOG_KEYS[2:]
    parts = [f"{k}={row[k]:.4g}" for k in keys if k in row and not math.isnan(row[k])]
    tqdm.write(f"{_prefix(cfg)}epoch {row['epoch']}/{cfg.epochs}  " + "  ".join(parts))
