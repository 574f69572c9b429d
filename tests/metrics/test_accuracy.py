import pytest
import torch

from kdprune.metrics import AccuracyMeter, topk_accuracy, topk_correct


def _logits():
    # 4 samples, 6 classes; rank of the target among the logits: 1, 2, 6, 3
    logits = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 0 -> rank 1
            [1.0, 9.0, 8.0, 3.0, 4.0, 5.0],  # target 2 -> rank 2
            [1.0, 9.0, 8.0, 3.0, 4.0, 5.0],  # target 0 -> rank 6
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 2 -> rank 3
        ]
    )
    targets = torch.tensor([0, 2, 0, 2])
    return logits, targets


def test_topk_correct_hand_made():
    logits, targets = _logits()
    assert topk_correct(logits, targets, ks=(1, 2, 3, 5)) == {1: 1, 2: 2, 3: 3, 5: 3}


def test_topk_k_clipped_to_num_classes():
    logits, targets = _logits()
    assert topk_correct(logits, targets, ks=(1, 10)) == {1: 1, 10: 4}
    assert topk_accuracy(logits[:, :3], torch.tensor([0, 2, 0, 2]), ks=(5,)) == {"top5": 100.0}


def test_topk_accuracy_percent():
    logits, targets = _logits()
    acc = topk_accuracy(logits, targets)
    assert acc == {"top1": 25.0, "top5": 75.0}


def test_meter_accumulation_matches_one_shot():
    torch.manual_seed(0)
    logits = torch.randn(37, 10)
    targets = torch.randint(0, 10, (37,))
    loss_fn = torch.nn.CrossEntropyLoss()
    meter = AccuracyMeter()
    for lo in range(0, 37, 8):  # uneven last batch: loss must be weighted by batch size
        lg, tg = logits[lo:lo + 8], targets[lo:lo + 8]
        meter.update(lg, tg, loss_fn(lg, tg))
    res = meter.compute()
    one_shot = topk_accuracy(logits, targets)
    assert res["n"] == 37
    assert res["top1"] == pytest.approx(one_shot["top1"])
    assert res["top5"] == pytest.approx(one_shot["top5"])
    assert res["loss"] == pytest.approx(loss_fn(logits, targets).item(), rel=1e-5)


def test_meter_tensor_roundtrip_and_merge():
    torch.manual_seed(1)
    a, b = AccuracyMeter(), AccuracyMeter()
    la, ta = torch.randn(5, 7), torch.randint(0, 7, (5,))
    lb, tb = torch.randn(3, 7), torch.randint(0, 7, (3,))
    a.update(la, ta, 1.5)
    b.update(lb, tb, 0.5)
    # what an all-reduce of two ranks would produce
    summed = AccuracyMeter.from_tensor(a.as_tensor() + b.as_tensor())
    both = AccuracyMeter()
    both.update(torch.cat([la, lb]), torch.cat([ta, tb]))
    both.loss_sum = 1.5 * 5 + 0.5 * 3
    assert summed.compute() == pytest.approx(both.compute())
    merged = AccuracyMeter.from_tensor(a.as_tensor()).merge(b)
    assert merged.compute() == pytest.approx(both.compute())
    assert a.sync() is a  # no process group: identity


def test_empty_meter():
    assert AccuracyMeter().compute() == {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0}
