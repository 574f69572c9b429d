"""Evaluation: loss, top-1/top-5 over a data set, exact under torchrun (no padded duplicates)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from kdprune.data import as_loader
from kdprune.metrics import AccuracyMeter
from kdprune.utils.dist import dist_info


def _shard(data: Dataset) -> Dataset:
    """This rank's strided share of `data`, without the padding DistributedSampler adds."""
    info = dist_info()
    if not info.enabled:
        return data
    idx = list(range(info.rank, len(data), info.world_size))  # type: ignore[arg-type]
    return data.subset(idx) if hasattr(data, "subset") else Subset(data, idx)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    bf16: bool = False,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) of `model` on `data` (its first
    ``max_batches`` batches when given: smoke runs)."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    meter = AccuracyMeter()
    loader = as_loader(_shard(data), batch_size, shuffle=False, rank=0, world_size=1)
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            meter.update(logits.float(), y, F.cross_entropy(logits.float(), y))
    finally:
        model.train(was_training)
    meter.sync()
    return meter.compute()
