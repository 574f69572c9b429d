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
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from kdprune.data import as_loader
from kdprune.distill.tasks import CETask
from kdprune.training.callbacks import Callback, LoopState, StopTraining
from kdprune.training.checkpoint import CHECKPOINT_NAME, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from kdprune.training.config import TrainConfig
from kdprune.training.evaluate import evaluate
from kdprune.training.optim import build_optimizer, build_schedule
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
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_info().local_rank)
    return dev


def check_input_compat(model: nn.Module, data: Any) -> None:
    """Fail early, naming both, when the model's input channels do not match the data's."""
    model_c = getattr(model, "in_chans", None)
    if model_c is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        model_c = first.in_channels if first is not None else None
    data_c = getattr(data, "in_chans", None)
    if data_c is None and hasattr(data, "dataset"):
        data_c = getattr(data.dataset, "in_chans", None)
    if model_c is not None and data_c is not None and model_c != data_c:
        raise ValueError(
            f"model expects in_chans={model_c} but the data has {data_c} channels; "
            f"create the model with in_chans={data_c}"
        )


def _train_epoch(runner, task, loader, opt, sched, cfg, state, callbacks, device, bar) -> dict[str, float]:
    """One pass over this rank's shard; returns all-reduced loss/accuracy and throughput."""
    runner.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= state.steps_per_epoch:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, terms = task(runner, x, y)
            loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_grads(extra_params(task))
        for cb in callbacks:
            cb.on_after_backward(state)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(runner.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        state.step += 1
        for cb in callbacks:
            cb.on_step_end(state)
        n = y.numel()
        sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=device)])
        _progress(bar, i, sums, n, t0, opt)
    elapsed = time.perf_counter() - t0
    all_reduce_sum(sums)
    loss_sum, correct, n = sums.tolist()
    return {"train_loss": loss_sum / max(n, 1), "train_top1": 100.0 * correct / max(n, 1),
            "train_images_per_s": n / elapsed, "epoch_time_s": elapsed}


def extra_params(task) -> list[torch.Tensor]:
    """Trainable parameters a task owns outside the model (not covered by DDP's gradient sync)."""
    return list(getattr(task, "trainable_parameters", lambda: [])())


def _average_grads(params: list[torch.Tensor]) -> None:
    world = dist_info().world_size
    for p in params:
        if world > 1 and p.grad is not None:
            all_reduce_sum(p.grad).div_(world)


def _progress(bar, i: int, sums: torch.Tensor, n: int, t0: float, opt) -> None:
    bar.update(1)
    if bar.disable or (i % 20 != 0):
        return  # .item() syncs: only every 20 steps
    loss_sum, correct, seen = sums.tolist()
    rate = seen / max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                    lr=f"{opt.param_groups[0]['lr']:.3g}", img_s=f"{rate:.0f}")


def _config_record(cfg: TrainConfig, model: nn.Module, task, extra: dict | None) -> dict[str, Any]:
    spec = getattr(model, "kdprune_spec", None)
    return {"train_config": {"type": type(cfg).__name__, **asdict(cfg),
                             "optimizer_type": type(cfg.optimizer).__name__,
                             "schedule_type": type(cfg.schedule).__name__},
            "task": type(task).__name__, "model": spec, **(extra or {}), "meta": run_metadata()}


def _restore(ckpt_path: Path, model, opt, sched, callbacks, device) -> tuple[int, int, list]:
    """Load a checkpoint into model/optimizer/schedule/callbacks; returns (epoch, step, history)."""
    ck = load_checkpoint(ckpt_path, map_location=device)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["schedule"])
    for i, cb in enumerate(callbacks):
        cb.load_state_dict(ck["callbacks"][i])
    restore_rng(ck["rng"])
    return ck["epoch"], ck["step"], ck["history"]


def _write_epoch(out: Path, model, opt, sched, callbacks, state, history) -> None:
    with open(out / "metrics.jsonl", "w") as f:  # rewritten whole: a resumed run stays consistent
        f.writelines(json.dumps(row) + "\n" for row in history)
    save_checkpoint(out / CHECKPOINT_NAME, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
        "callbacks": [cb.state_dict() for cb in callbacks], "rng": capture_rng(),
        "epoch": state.epoch, "step": state.step, "history": history,
    })


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, distributed: bool) -> nn.Module:
    runner = model
    if distributed:
        runner = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)
    return runner


def _save_final(out: Path, model: nn.Module) -> None:
    if getattr(model, "kdprune_spec", None) is None and getattr(model, "kdprune_factory", None) is None:
        return  # a bare user module: the checkpoint holds its weights
    from kdprune.io import save_pruned

    save_pruned(model, out / "model", factory=getattr(model, "kdprune_factory", None))


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

    With `out_dir`, writes config/metrics/checkpoints there and, if `save_model`, the final model
    (a stage inside a compression method passes False: the method saves its own result)."""
    cfg = config or TrainConfig()
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_input_compat(model, train_data)
    task = task if task is not None else CETask(label_smoothing=cfg.label_smoothing)
    seed_everything(cfg.seed)
    model = model.to(device)
    for m in getattr(task, "modules", lambda: [])():
        m.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {info.world_size} ranks")
    loader = as_loader(train_data, cfg.batch_size // info.world_size, shuffle=True,
                       augment=cfg.augment, drop_last=True, seed=cfg.seed)
    steps = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    if steps == 0:
        raise ValueError(f"no full batch of {cfg.batch_size} in the training data ({len(loader.dataset)} samples)")
    own = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg.optimizer, own + extra_params(task))  # + e.g. hint adapters
    sched = build_schedule(cfg.schedule, opt, steps, cfg.epochs)
    out = Path(out_dir) if out_dir is not None else None
    state = LoopState(model, opt, 0, 0, steps, cfg.epochs)
    history: list[dict[str, float]] = []
    if resume:
        if out is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        state.epoch, state.step, history = _restore(out / CHECKPOINT_NAME, model, opt, sched, callbacks, device)
    elif out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", _config_record(cfg, model, task, record))
    runner = _wrap(model, cfg, device, info.enabled)
    for cb in callbacks:
        cb.on_train_start(state)
    return _run_epochs(runner, model, task, loader, val_data, opt, sched, cfg, state,
                       callbacks, device, out, history, info.is_main, save_model)


def _run_epochs(runner, model, task, loader, val_data, opt, sched, cfg, state, callbacks,
                device, out, history, is_main, save_model) -> TrainResult:
    metrics: dict[str, float] = history[-1] if history else {}
    try:
        while state.epoch < cfg.epochs:
            loader.set_epoch(state.epoch)
            bar = tqdm(total=state.steps_per_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                       disable=not (is_main and cfg.progress), mininterval=1.0, leave=False)
            with bar:
                row = _train_epoch(runner, task, loader, opt, sched, cfg, state, callbacks, device, bar)
            if val_data is not None and ((state.epoch + 1) % cfg.eval_every == 0 or state.epoch + 1 == cfg.epochs):
                row.update({f"val_{k}": v for k, v in evaluate(model, val_data, cfg.eval_batch_size, device, cfg.bf16).items()})
            row = {"epoch": state.epoch + 1, "step": state.step, "lr": opt.param_groups[0]["lr"], **row}
            state.epoch += 1
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            history.append(row)
            metrics = row
            if is_main:
                _log_row(row, cfg)
                if out is not None:
                    _write_epoch(out, model, opt, sched, callbacks, state, history)
            barrier()
    except StopTraining:
        pass
    if save_model and out is not None and is_main:
        _save_final(out, model)
    return TrainResult(model=model, history=history, metrics=metrics, out_dir=out)


def _log_row(row: dict[str, float], cfg: TrainConfig) -> None:
    if not cfg.progress:
        return
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "train_images_per_s", "epoch_time_s")
    parts = [f"{k}={row[k]:.4g}" for k in keys if k in row and not math.isnan(row[k])]
    tqdm.write(f"epoch {row['epoch']}/{cfg.epochs}  " + "  ".join(parts))
