"""Run by test_ddp under torchrun: trains TinyNet on 2 gloo ranks, saves each rank's weights."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kdprune.training import TrainConfig, train  # noqa: E402
from kdprune.training.config import SGD  # noqa: E402
from kdprune.utils.dist import dist_info  # noqa: E402
from tests.conftest import TinyNet, make_images  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = dist_info().rank
    torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
    train_set, val_set = make_images(64, seed=0), make_images(20, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer=SGD(lr=0.05), progress=False, seed=3)
    res = train(TinyNet(), train_set, val_set, cfg, out_dir=out / "run")
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"metrics{rank}.txt").write_text(repr(sorted((k, v) for k, v in res.metrics.items()
                                                        if k not in ("epoch_time_s", "train_images_per_s"))))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
