"""The training loop: it learns, it resumes bit-exactly, it writes its run directory."""
import json

import pytest
import torch

from kdprune.training import Callback, TrainConfig, train
from kdprune.training.config import SGD, Cosine

from ..conftest import TinyNet


def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, eval_batch_size=32, optimizer=SGD(lr=0.05),
                schedule=Cosine(), progress=False, seed=1)
    return TrainConfig(**{**base, **kw})


class _Kill(Callback):
    """Simulates a crash in the middle of an epoch."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, state) -> None:
        if state.step == self.at_step:
            raise KeyboardInterrupt("killed")


class _Counter(Callback):
    """A stateful callback: its state must survive resume."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, state) -> None:
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, s):
        self.steps = s["steps"]


def test_training_learns_and_writes_run_dir(toy_data, tmp_path):
    train_set, val_set = toy_data
    torch.manual_seed(0)
    res = train(TinyNet(), train_set, val_set, _cfg(epochs=8, optimizer=SGD(lr=0.1)), out_dir=tmp_path)
    assert res.metrics["val_top1"] > 60.0  # 4 classes: chance is 25%
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train_config"]["epochs"] == 8 and "git_commit" in cfg["meta"]
    assert (tmp_path / "checkpoint.pt").is_file()


def test_resume_after_kill_is_bit_exact(toy_data, tmp_path):
    train_set, val_set = toy_data
    torch.manual_seed(0)
    ref_cb = _Counter()
    ref = train(TinyNet(), train_set, val_set, _cfg(), out_dir=tmp_path / "ref", callbacks=[ref_cb])

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(TinyNet(), train_set, val_set, _cfg(), out_dir=tmp_path / "run", callbacks=[_Counter(), _Kill(12)])
    torch.manual_seed(123)  # a fresh process: different init, different global RNG
    cb = _Counter()
    res = train(TinyNet(), train_set, val_set, _cfg(), out_dir=tmp_path / "run", resume=True, callbacks=[cb])

    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert res.history == [{**r, "epoch_time_s": s["epoch_time_s"], "train_images_per_s": s["train_images_per_s"]}
                           for r, s in zip(ref.history, res.history)]
    assert cb.steps == ref_cb.steps == 3 * 8


def test_resume_needs_checkpoint(toy_data, tmp_path):
    train_set, val_set = toy_data
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TinyNet(), train_set, val_set, _cfg(), out_dir=tmp_path, resume=True)


def test_in_chans_mismatch_is_clear(toy_data):
    train_set, val_set = toy_data
    with pytest.raises(ValueError, match="in_chans=3 but the data has 1"):
        train(TinyNet(in_chans=3), train_set, val_set, _cfg())


def test_plain_torch_dataset_and_grad_clip(toy_data):
    train_set, _ = toy_data
    plain = torch.utils.data.TensorDataset(train_set.normalized(), train_set.labels)
    res = train(TinyNet(), plain, plain, _cfg(epochs=1, grad_clip=1.0, max_steps_per_epoch=2, augment=False))
    assert res.history[0]["step"] == 2 and 0 <= res.metrics["val_top1"] <= 100


def test_bf16_autocast_runs(toy_data):
    train_set, val_set = toy_data
    res = train(TinyNet(), train_set, val_set, _cfg(epochs=1, bf16=True, max_steps_per_epoch=2))
    assert torch.isfinite(torch.tensor(res.metrics["train_loss"]))


class _LRs(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step_end(self, state) -> None:
        self.lrs.append(state.lr)


def _no_dropout(net: TinyNet) -> TinyNet:
    net.features[6].p = 0.0
    return net


def test_a_run_split_in_two_stages_equals_one_run(toy_data):
    """start_epoch / schedule_epochs continue the LR schedule and the data order (augmentation
    included): without optimizer state (momentum 0) or dropout (each stage reseeds the global RNG),
    two stages give bit-exactly the weights of one uninterrupted run."""
    train_set, _ = toy_data
    opt = SGD(lr=0.05, momentum=0.0)
    torch.manual_seed(0)
    ref, ref_lr = _no_dropout(TinyNet()), _LRs()
    train(ref, train_set, None, _cfg(epochs=3, optimizer=opt), callbacks=[ref_lr])
    torch.manual_seed(0)
    model, lr = _no_dropout(TinyNet()), _LRs()
    train(model, train_set, None, _cfg(epochs=1, schedule_epochs=3, optimizer=opt), callbacks=[lr])
    train(model, train_set, None, _cfg(epochs=2, start_epoch=1, schedule_epochs=3, optimizer=opt), callbacks=[lr])
    assert lr.lrs == ref_lr.lrs and ref_lr.lrs[0] > ref_lr.lrs[-1] > 0
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_stage_window_is_validated():
    assert _cfg(epochs=2, start_epoch=1).total_epochs() == 3
    with pytest.raises(ValueError, match="do not fit"):
        _cfg(epochs=3, start_epoch=1, schedule_epochs=3)
    with pytest.raises(ValueError, match="do not fit"):
        _cfg(start_epoch=-1)


def test_window_is_a_slice_of_the_same_schedule():
    """window(i, n) of a stage is epochs [start + i, start + i + n) of the whole run's schedule."""
    run = _cfg(epochs=4, start_epoch=2, schedule_epochs=8)
    w = run.window(1, 2)
    assert (w.start_epoch, w.epochs, w.total_epochs()) == (3, 2, 8)
    assert [run.window(i, 1).start_epoch for i in range(4)] == [2, 3, 4, 5]
    assert _cfg(epochs=3).window(0, 3).total_epochs() == 3
    for offset, n in [(-1, 1), (3, 2), (0, 5)]:
        with pytest.raises(ValueError, match="not within"):
            run.window(offset, n)


def test_max_steps_per_epoch_caps_the_evaluation_too(toy_data):
    train_set, val_set = toy_data
    torch.manual_seed(0)
    model, seen = TinyNet(), []
    model.register_forward_hook(lambda m, a, out: None if m.training else seen.append(a[0].shape[0]))
    cfg = TrainConfig(epochs=1, batch_size=16, eval_batch_size=8, max_steps_per_epoch=1, progress=False)
    train(model, train_set, val_set, cfg)
    assert seen == [8]  # one evaluation batch of the 32 validation images, not four
