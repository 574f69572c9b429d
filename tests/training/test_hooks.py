"""Loop extension points: hook order, the step's learning rate, batch/outputs/terms in the state,
owned parameters, per-term logs, task modules (train/eval, evaluation, exact resume)."""
import json

import pytest
import torch
from torch import nn

from kdprune.distill import HintKDTask, HintLoss, KDTask
from kdprune.training import Callback, TrainConfig, train
from kdprune.training.config import SGD, Cosine, Step

from ..conftest import TinyNet
from .helpers import MutualTask, PlainNet


def _cfg(**kw):
    base = dict(epochs=2, batch_size=16, optimizer=SGD(lr=0.1, momentum=0.0, weight_decay=0.0),
                schedule=Cosine(), progress=False, seed=1, augment=False)
    return TrainConfig(**{**base, **kw})


class _LrProbe(Callback):
    """Measures the learning rate SGD really used from the update of one weight, and compares it
    with what the loop reports to each hook."""

    def __init__(self) -> None:
        self.rows, self.order = [], []

    def on_after_backward(self, state):
        w = state.model.fc.weight
        self._w, self._g = w.detach().clone(), w.grad.detach().clone()
        self.order.append("after_backward")

    def on_optimizer_step(self, state):
        w = state.model.fc.weight.detach()
        i = self._g.abs().argmax()
        used = ((self._w - w).flatten()[i] / self._g.flatten()[i]).item()
        self.rows.append((state.step, used, state.lr, state.optimizer.param_groups[0]["lr"]))
        self.order.append("optimizer_step")

    def on_step_end(self, state):
        self.order.append("step_end")
        self.end_lr = state.lr


def test_optimizer_step_hook_sees_its_own_steps_lr(toy_data):
    probe = _LrProbe()
    cfg = _cfg(schedule=Step(milestones=(0.5,), gamma=0.1), max_steps_per_epoch=4)
    train(TinyNet(), toy_data[0], None, cfg, callbacks=[probe])
    assert probe.order[:6] == ["after_backward", "optimizer_step", "step_end"] * 2
    steps = [r[0] for r in probe.rows]
    assert steps == list(range(1, 9))  # state.step already counts the update
    for step, used, reported, live in probe.rows:
        assert used == pytest.approx(reported, rel=1e-3)  # the lr of this very update
        assert live == reported  # the scheduler has not stepped yet
    assert [round(r[2], 6) for r in probe.rows] == [0.1] * 4 + [0.01] * 4  # the decay lands at step 5


class _SoftThreshold(Callback):
    """A proximal step on an owned scalar: u = soft(u - lr * g, lr * lam) (ISTA)."""

    def __init__(self, param: nn.Parameter, lam: float) -> None:
        self.param, self.lam, self.log = param, lam, []

    def owned_parameters(self):
        return [self.param]

    def on_after_backward(self, state):
        self._before, self._grad = self.param.detach().clone(), self.param.grad.detach().clone()
        assert state.x is not None and state.outputs.shape[0] == state.y.shape[0] and "ce" in state.terms

    @torch.no_grad()
    def on_optimizer_step(self, state):
        assert torch.equal(self.param, self._before)  # SGD did not touch it
        z = self.param - state.lr * self.param.grad
        self.param.copy_(torch.sign(z) * torch.clamp(z.abs() - state.lr * self.lam, min=0))
        self.log.append((self._before.item(), self._grad.item(), state.lr, self.param.item()))


class _ScaledNet(PlainNet):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return super().forward(x) * (1 + self.scale)


def test_owned_parameter_follows_its_proximal_step_only(toy_data):
    torch.manual_seed(0)
    model = _ScaledNet()
    prox = _SoftThreshold(model.scale, lam=0.5)
    train(model, toy_data[0], None, _cfg(max_steps_per_epoch=3, optimizer=SGD(lr=0.1, momentum=0.9)),
          callbacks=[prox])
    assert len(prox.log) == 6
    for before, grad, lr, after in prox.log:  # closed form of the prox of lam*|u|, no momentum
        z = before - lr * grad
        assert after == pytest.approx(max(abs(z) - lr * 0.5, 0.0) * (1 if z > 0 else -1), abs=1e-7)


def test_kd_run_logs_its_terms(toy_data, tmp_path):
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    res = train(student, *toy_data, _cfg(max_steps_per_epoch=3), task=KDTask(teacher, alpha=0.7), out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["train_ce"] > 0 and row["train_kd"] > 0
        assert row["train_ce"] + row["train_kd"] == pytest.approx(row["train_loss"], rel=1e-6)
    assert res.history == rows


class _ModeProbe(nn.Module):
    """A trainable task module recording whether it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.modes: list[bool] = []

    def forward(self, z):
        self.modes.append(self.training)
        return self.lin(z)


class _HeadTask(MutualTask):
    def __init__(self) -> None:
        super().__init__(PlainNet())
        self.head = _ModeProbe()

    def __call__(self, model, x, y):
        logits, terms = super().__call__(model, x, y)
        terms["head"] = torch.nn.functional.cross_entropy(self.head(logits.detach()), y)
        return logits, terms

    def trainable_modules(self):
        return {"peer": self.peer, "head": self.head}

    def eval_models(self, model):
        return {"": model, "peer": self.peer, "head": nn.Sequential(model, self.head)}


def test_task_modules_train_evaluate_and_follow_modes(toy_data):
    torch.manual_seed(0)
    task = _HeadTask()
    peer0 = {k: v.clone() for k, v in task.peer.state_dict().items()}
    res = train(PlainNet(), *toy_data, _cfg(max_steps_per_epoch=3, epochs=1), task=task)
    assert any(not torch.equal(v, task.peer.state_dict()[k]) for k, v in peer0.items())  # optimised
    assert task.head.modes[:3] == [True] * 3 and task.head.modes[3:] and not any(task.head.modes[3:])
    assert {"val_top1", "val_peer_top1", "val_head_top1", "train_head", "train_mutual"} <= set(res.metrics)


def test_reserved_term_names_are_refused(toy_data):
    class Bad:
        def __call__(self, model, x, y):
            return model(x), {"loss": torch.nn.functional.cross_entropy(model(x), y)}

    with pytest.raises(ValueError, match="reserved"):
        train(TinyNet(), toy_data[0], None, _cfg(max_steps_per_epoch=1, epochs=1), task=Bad())


def _hint_run(toy_data, out, resume, kill_at=None):
    torch.manual_seed(0)
    teacher, student = TinyNet(width=8), TinyNet(width=6)
    torch.manual_seed(123 if resume else 0)  # a fresh process draws other adapters: the checkpoint must hold them
    task = HintKDTask(teacher, ["features.4"], ["features.4"], HintLoss([6], [8]), beta=0.5)

    class Kill(Callback):
        def on_step_end(self, state):
            if state.step == kill_at:
                raise KeyboardInterrupt("killed")

    cfg = _cfg(epochs=3, max_steps_per_epoch=4, optimizer=SGD(lr=0.05, momentum=0.9), augment=True)
    res = train(student, *toy_data, cfg, task=task, out_dir=out, resume=resume,
                callbacks=[Kill()] if kill_at else [])
    return {**res.model.state_dict(), **{f"hint.{k}": v for k, v in task.hint.state_dict().items()}}


def test_task_with_trainable_modules_resumes_bit_exactly(toy_data, tmp_path):
    ref = _hint_run(toy_data, tmp_path / "ref", False)
    with pytest.raises(KeyboardInterrupt):
        _hint_run(toy_data, tmp_path / "run", False, kill_at=6)  # mid-epoch 2
    got = _hint_run(toy_data, tmp_path / "run", True)
    assert list(ref) == list(got) and any(k.startswith("hint.") for k in ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
