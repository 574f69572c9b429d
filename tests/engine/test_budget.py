"""The budget service: discrete and channel families, closest candidates, unreachable targets,
neighbour refinement, memoisation, and the model (and RNG) left untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdprune.engine import (
    TOLERANCE, Bisection, BudgetError, BudgetMeter, Global, Refine, Target, channel_groups,
    fit_budget, importance_scores, plan_pruning, search_budget,
)
from kdprune.metrics import complexity
from tests.engine.tiny_models import WideNet

X = torch.randn(1, 3, 8, 8)
N = 4


class Stack(nn.Module):
    """stem conv -> N identical conv blocks -> pool -> fc: removing k blocks is a discrete family."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(N)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def remove_blocks(model: Stack, x: torch.Tensor, k: int) -> None:
    """The edit: the first k blocks become identities."""
    for i in range(k):
        model.blocks[i] = nn.Identity()


def blocks_family(t: float) -> int:
    return round(t * N)


def kept_after(k: int) -> float:
    m = Stack()
    dense = complexity(m, example_input=X).flops
    remove_blocks(m, X, k)
    return complexity(m, example_input=X).flops / dense


def test_discrete_family_lands_on_the_candidate_within_tolerance():
    m = Stack()
    fit = fit_budget(m, X, Target(flops=kept_after(2) + 0.004), blocks_family, apply=remove_blocks)
    assert fit.met and fit.best.candidate == 2 and fit.best.kept == pytest.approx(kept_after(2))
    assert all(isinstance(b, nn.Sequential) for b in m.blocks)  # measured on copies only


def test_discrete_family_closest_candidate_and_error_naming_the_bracket():
    goal = (kept_after(1) + kept_after(2)) / 2 - 0.01  # between two candidates, nearer to k=2
    meter = BudgetMeter(Stack(), X, Target(flops=goal), apply=remove_blocks)
    fit = search_budget(meter, blocks_family, bisection=Bisection(steps=30, first_within=False))
    assert not fit.met and fit.best.candidate == 2
    assert {fit.lo[1].candidate, fit.hi[1].candidate} == {1, 2}
    with pytest.raises(BudgetError, match=f"{kept_after(1):.4f} and {kept_after(2):.4f}") as e:
        fit_budget(Stack(), X, Target(flops=goal), blocks_family, apply=remove_blocks)
    assert isinstance(e.value, ValueError) and not e.value.fit.met


def test_unreachable_target_names_the_smallest_reachable_fraction():
    floor = kept_after(N)
    msg = rf"unreachable under 4 blocks: the smallest reachable fraction is {floor:.4f}"
    with pytest.raises(ValueError, match=msg):
        fit_budget(Stack(), X, Target(flops=floor / 2), blocks_family, apply=remove_blocks, limits=" under 4 blocks")


@pytest.mark.parametrize("one_sided", [False, True])
def test_neighbour_moves_refine_a_coarse_family(one_sided):
    def pairs(t: float) -> int:  # only even numbers of blocks: k=1 is out of the family's reach
        return 2 * round(t * N / 2)

    def neighbours(k: int, over: bool) -> list[list[int]]:
        return [[k + 1]] if over and k < N else [[k - 1]] if not over and k > 0 else [[]]

    target = Target(flops=kept_after(1))
    with pytest.raises(BudgetError):
        fit_budget(Stack(), X, target, pairs, apply=remove_blocks)
    fit = fit_budget(Stack(), X, target, pairs, neighbours, apply=remove_blocks,
                     bisection=Bisection(first_within=not one_sided), refine=Refine(rounds=4, one_sided=one_sided))
    assert fit.met and fit.refined and fit.best.candidate == 1


def test_channel_family_bisection_lands_within_one_percent():
    torch.manual_seed(0)
    m = WideNet()
    before = copy.deepcopy(m.state_dict())
    groups = channel_groups(m, X)
    scores = importance_scores(m, groups)
    target = Target(params=0.6)
    fit = fit_budget(m, X, target, lambda r: plan_pruning(groups, scores, r, Global()))
    assert fit.met and abs(fit.best.kept - 0.6) <= TOLERANCE and 0.0 < fit.t < 1.0
    assert fit.best.complexity.params / complexity(m, example_input=X).params == pytest.approx(fit.best.kept)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_memoised_evaluations_and_rng_untouched():
    calls = []

    def counted(model: Stack, x: torch.Tensor, k: int) -> None:
        calls.append(k)
        remove_blocks(model, x, k)

    meter = BudgetMeter(Stack(), X, Target(flops=0.65), apply=counted)
    proposed = []
    state = torch.random.get_rng_state()
    fit = search_budget(meter, lambda t: proposed.append(blocks_family(t)) or proposed[-1],
                        bisection=Bisection(steps=20, first_within=False))
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(proposed) > len(set(proposed)) and sorted(calls) == sorted(set(proposed))
    assert meter.evaluations == fit.evaluations == len(set(proposed))
    meter.measure(2)
    meter.measure(fit.best.candidate)
    assert meter.evaluations == len(set(proposed) | {2})
