"""Top-k accuracy and a distributed-friendly accumulating meter."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def topk_correct(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, int]:
    """Number of samples whose target is among the top-k logits, per requested k."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if not ks:
        return {}
    num_classes = logits.shape[1]
    # k is clipped to C so "top5" on a 3-class problem is well defined (== 100%)
    # instead of raising inside torch.topk.
    maxk = min(max(ks), num_classes)
    pred = logits.detach().topk(maxk, dim=1).indices  # (N, maxk), best first
    hits = pred.eq(targets.detach().view(-1, 1).to(pred.device))  # (N, maxk)
    cum = hits.cumsum(dim=1).clamp_(max=1)  # hit within the first j+1 predictions
    return {k: int(cum[:, min(k, num_classes) - 1].sum().item()) for k in ks}


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent, keyed "top1", "top5", ..."""
    n = logits.shape[0]
    correct = topk_correct(logits, targets, ks)
    return {f"top{k}": (100.0 * c / n if n else 0.0) for k, c in correct.items()}


class AccuracyMeter:
    """Accumulates loss sum, top-k correct counts and sample count over batches (and ranks)."""

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks: tuple[int, ...] = tuple(ks)
        self.reset()

    def reset(self) -> None:
        """Zero all accumulators."""
        self.loss_sum = 0.0
        self.n = 0
        self.correct: dict[int, int] = {k: 0 for k in self.ks}

    def update(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor | float | None = None,
    ) -> None:
        """Add one batch; `loss` is the batch-mean loss (weighted by batch size here)."""
        n = int(logits.shape[0])
        for k, c in topk_correct(logits, targets, self.ks).items():
            self.correct[k] += c
        if loss is not None:
            self.loss_sum += float(loss) * n
        self.n += n

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Pack state as [loss_sum, n, correct_k...] (float64 keeps counts exact up to 2**53)."""
        vals = [self.loss_sum, float(self.n)] + [float(self.correct[k]) for k in self.ks]
        return torch.tensor(vals, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, ks: Sequence[int] = (1, 5)) -> "AccuracyMeter":
        """Rebuild a meter from `as_tensor()` output (e.g. after an all-reduce)."""
        ks = tuple(ks)
        vals = t.detach().double().cpu().tolist()
        if len(vals) != 2 + len(ks):
            raise ValueError(f"tensor has {len(vals)} entries, expected {2 + len(ks)} for ks={ks}")
        meter = cls(ks)
        meter.loss_sum = vals[0]
        meter.n = int(round(vals[1]))
        meter.correct = {k: int(round(v)) for k, v in zip(ks, vals[2:])}
        return meter

    def merge(self, other: "AccuracyMeter") -> "AccuracyMeter":
        """Add another meter's counts into this one (same ks); returns self."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge meters with ks {self.ks} and {other.ks}")
        self.loss_sum += other.loss_sum
        self.n += other.n
        for k in self.ks:
            self.correct[k] += other.correct[k]
        return self

    def sync(self) -> "AccuracyMeter":
        """Sum state over all ranks in place when torch.distributed is initialised; returns self."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        # NCCL only reduces CUDA tensors; gloo wants CPU ones.
        device = None
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = self.as_tensor(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        synced = self.from_tensor(t, self.ks)
        self.loss_sum, self.n, self.correct = synced.loss_sum, synced.n, synced.correct
        return self

    def compute(self) -> dict[str, float]:
        """Mean loss, top-k accuracy in percent and sample count: {"loss", "top1", "top5", "n"}."""
        n = self.n
        out: dict[str, float] = {"loss": self.loss_sum / n if n else 0.0}
        for k in self.ks:
            out[f"top{k}"] = 100.0 * self.correct[k] / n if n else 0.0
        out["n"] = n
        return out
