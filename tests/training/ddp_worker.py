"""Run by test_ddp under torchrun: trains on 2 gloo ranks, saves each rank's weights.

Modes: ``ce`` trains TinyNet with cross-entropy; ``mutual`` trains PlainNet with a peer network
(a two-model task, MutualTask) and ``kd`` distils a frozen PlainNet teacher into a PlainNet, both
on unaugmented data, to compare with one process."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kdprune.training import TrainConfig, train  # noqa: E402
from kdprune.training.config import SGD  # noqa: E402
from kdprune.utils.dist import dist_info  # noqa: E402
from tests.conftest import TinyNet, make_images  # noqa: E402
from tests.training.helpers import MutualTask, PlainNet  # noqa: E402


def mutual_setup(seed: int) -> tuple:
    """Student, task and config of the two-model run (same in torchrun and in one process)."""
    torch.manual_seed(seed)
    student, peer = PlainNet(), PlainNet(width=5)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer=SGD(lr=0.1), augment=False, progress=False, seed=3)
    return student, MutualTask(peer), cfg


def kd_setup(seed: int) -> tuple:
    """Student, KD task (frozen teacher, same on every rank) and config of the distillation run."""
    from kdprune.distill import KDTask

    torch.manual_seed(11)
    teacher = PlainNet(width=8)
    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer=SGD(lr=0.1), augment=False, progress=False, seed=3)
    return PlainNet(), KDTask(teacher, temperature=2.0, alpha=0.5), cfg


def recal_setup() -> torch.nn.Module:
    """The net whose BatchNorm statistics the ``recal`` mode re-estimates (same on every rank)."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))


def recal(out: Path, rank: int, data) -> None:
    """Re-estimate on every batch of this rank's shard; the statistics must be the whole set's."""
    from kdprune.engine import Recalibrate, recalibrate_norms
    from kdprune.utils.dist import init_distributed

    init_distributed()
    net = recal_setup()
    rep = recalibrate_norms(net, data, Recalibrate(batches=100, batch_size=8))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"metrics{rank}.txt").write_text(repr(sorted(net.state_dict().items(), key=lambda kv: kv[0])))
    (out / f"images{rank}.txt").write_text(str(rep.images))


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    rank = dist_info().rank
    train_set, val_set = make_images(64, seed=0), make_images(20, seed=1)
    if mode == "recal":
        return recal(out, rank, train_set)
    if mode == "mutual":
        # different init per rank: DDP must broadcast rank 0's, for the peer too
        student, task, cfg = mutual_setup(seed=7 if rank == 0 else 100 + rank)
        res = train(student, train_set, val_set, cfg, task=task, out_dir=out / "run")
        weights = {**res.model.state_dict(), **{f"peer.{k}": v for k, v in task.peer.state_dict().items()}}
    elif mode == "kd":
        student, task, cfg = kd_setup(seed=7 if rank == 0 else 100 + rank)
        res = train(student, train_set, val_set, cfg, task=task, out_dir=out / "run")
        weights = res.model.state_dict()
    else:
        torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
        cfg = TrainConfig(epochs=2, batch_size=16, optimizer=SGD(lr=0.05), progress=False, seed=3)
        res = train(TinyNet(), train_set, val_set, cfg, out_dir=out / "run")
        weights = res.model.state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"metrics{rank}.txt").write_text(repr(sorted((k, v) for k, v in res.metrics.items()
                                                        if k not in ("epoch_time_s", "train_images_per_s"))))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ce")
