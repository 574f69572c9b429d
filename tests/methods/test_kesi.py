"""KESI (Le, Vo, Thoai, BMVC 2020): per-round plan math, one-cycle schedule, ensemble KD loss,
snapshot save/load and bit-exact resume. Tiny models, fixed seeds."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

import kdprune as kp
from kdprune.distill import MeanKL, MeanProb
from kdprune.engine import channel_groups
from kdprune.methods import kesi as K
from kdprune.methods.base import CompressContext
from kdprune.metrics import complexity
from kdprune.models import create_model
from kdprune.training import loop as train_loop
from kdprune.training.optim import build_optimizer, build_schedule

from ..conftest import TinyNet

torch.set_num_threads(1)

FT = kp.TrainConfig(epochs=2, batch_size=32, progress=False, seed=3)
DT = kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.Adam(lr=1e-3), schedule=K.default_distill().schedule,
                    progress=False, seed=4)


@pytest.mark.parametrize("name,kwargs,key,final,rounds", [
    ("resnet20", {}, "flops", 0.5, 3),
    ("vgg16_bn", {}, "params", 0.3, 2),
    ("mobilenetv2", {"width_mult": 0.25}, "flops", 0.5, 2),
])
def test_round_plan_compounds_to_the_target(name, kwargs, key, final, rounds):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, **kwargs)
    x = torch.zeros(1, 1, 8, 8)
    recipe = K.KESI(rounds=rounds, **{f"target_{key}": final})
    dense = complexity(model, example_input=x)
    goals = K.round_goals(final, rounds)
    assert goals == pytest.approx([final ** (r / rounds) for r in range(1, rounds + 1)])
    assert goals[-1] == final
    for goal in goals:
        info = K.prune_round(recipe, model, x, goal, dense)
        assert abs(info[f"{key}_kept"] - goal) <= 0.01  # each round: |kept/dense - goal| <= 1%
    kept = getattr(complexity(model, example_input=x), key) / getattr(dense, key)
    assert abs(kept - final) <= 0.01


def _widths(model: nn.Module, suffix: str) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if n.endswith(suffix)}


def test_stage_ratios_compound_per_stage():
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x = torch.zeros(1, 1, 16, 16)
    recipe, dense = K.KESI(stage_ratios=(0.1, 0.2, 0.3), rounds=3), complexity(model, example_input=x)
    assert recipe.target() is None
    stages = K.stage_index(model, x, channel_groups(model, x))
    inner = {f"layer{s + 1}.{b}.conv1": s for s in range(3) for b in range(3)}
    assert stages == {**inner, "conv1": 0, "layer2.0.conv2": 1, "layer3.0.conv2": 2}  # + option-A streams
    stream = _widths(model, "conv2")
    for _ in range(3):
        K.prune_round(recipe, model, x, None, dense)
    inner = _widths(model, "conv1")
    for s, (c, r) in enumerate([(16, 0.1), (32, 0.2), (64, 0.3)]):
        kept = sum(w for n, w in inner.items() if n.startswith(f"layer{s + 1}."))
        assert abs(kept - 3 * c * (1 - r) ** 3) <= 3 * 3  # dithering: at most 1 channel/group/round
    assert _widths(model, "conv2") == stream  # residual stream untouched


def test_keep_residual_spares_summed_channels():
    model = create_model("resnet18", num_classes=10, in_chans=1)
    x = torch.zeros(1, 1, 16, 16)
    summed = K.residual_roots(channel_groups(model, x))
    assert "conv1" in summed and "layer2.0.downsample.0" in summed
    before = {n: model.get_submodule(n).out_channels for n in summed}
    dense = complexity(model, example_input=x)
    info = K.prune_round(K.KESI(target_params=0.5, rounds=1), model, x, 0.5, dense)
    assert abs(info["params_kept"] - 0.5) <= 0.01
    assert {n: model.get_submodule(n).out_channels for n in summed} == before


def _lrs(sched, opt, steps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(steps):
        g = opt.param_groups[0]
        out.append((g["lr"], g["momentum"] if "momentum" in g else g["betas"][0]))
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("which", ["retrain", "distill"])
def test_one_cycle_schedule_matches_torch(which):
    recipe = K.KESI(target_flops=0.5)
    cfg = recipe.retrain_config() if which == "retrain" else recipe.distill_config()
    steps, epochs, peak = 10, 3, (0.1 if which == "retrain" else 1e-3)
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg.optimizer, [p1])
    ours = _lrs(build_schedule(cfg.schedule, opt, steps, epochs), opt, steps * epochs)
    ref_opt = type(opt)([p2], lr=peak)
    ref = OneCycleLR(ref_opt, max_lr=peak, total_steps=steps * epochs, pct_start=0.1, div_factor=10,
                     final_div_factor=100)
    assert ours == _lrs(ref, ref_opt, steps * epochs)
    assert ours[0][0] == pytest.approx(peak / 10)  # warm-up starts at max/10 ...
    assert max(ours) == ours[2] and ours[2][0] == pytest.approx(peak)  # ... peaks after 10% ...
    assert ours[-1][0] == pytest.approx(peak / 1000, rel=0.05)  # cosine down to max/1000
    assert ours[0][1] == pytest.approx(0.95) and min(m for _, m in ours) == pytest.approx(0.85)


def test_lr_and_epoch_overrides_and_pfec_defaults():
    r = K.KESI(target_flops=0.5, retrain_epochs=3, max_lr=0.05, distill_epochs=2, distill_lr=2e-3)
    assert (r.retrain_config().epochs, r.retrain_config().optimizer.lr) == (3, 0.05)
    assert (r.distill_config().epochs, r.distill_config().optimizer.lr) == (2, 2e-3)
    assert K.KESI(target_flops=0.5, distill_epochs=0).distill_config() is None  # PFEC + one-cycle
    pfec = kp.recipes.KESIPFEC(target_flops=0.5)
    assert pfec.distill_config() is None and isinstance(pfec.retrain_config().schedule, kp.Constant)
    assert pfec.retrain_config().optimizer.lr == 1e-3
    with pytest.raises(ValueError, match="not both"):
        K.KESI(target_flops=0.5, stage_ratios=(0.1,)).check()
    with pytest.raises(ValueError, match="teacher_mode"):
        K.KESI(target_flops=0.5, teacher_mode="max").check()


def test_single_teacher_ablation_distils_from_the_base_alone():
    snaps, dense = [nn.Linear(2, 2), nn.Linear(2, 2)], nn.Linear(2, 3)
    names = [n for n, _ in K.ensemble_members(K.KESI(target_flops=0.5, include_snapshots=False), snaps, dense)]
    assert names == ["base"]
    names = [n for n, _ in K.ensemble_members(K.KESI(target_flops=0.5), snaps, dense)]
    assert names == ["base", "round1", "round2"]
    with pytest.raises(ValueError, match="no teachers"):
        K.KESI(target_flops=0.5, include_base=False, include_snapshots=False).check()


def test_cli_builds_kesi_recipes(tmp_path):
    from kdprune.cli.compress_cmd import build_recipe, methods
    from kdprune.cli.main import build_parser

    assert methods()["kesi"] is K.KESI and methods()["pfec"] is K.KESIPFEC
    args = build_parser().parse_args(["compress", "--method", "kesi", "--from", "x", "--out", "y",
                                      "--target-flops", "0.4", "--epochs", "3", "--temperature", "4"])
    r = build_recipe(args)
    assert (r.target_flops, r.temperature, r.retrain_config().epochs) == (0.4, 4.0, 3)
    assert isinstance(r.retrain_config().schedule, kp.OneCycle) and r.distill_config().epochs == 40
    (tmp_path / "k.yaml").write_text("method: kesi\nrecipe: {stage_ratios: [0.1, 0.2, 0.3], distill_epochs: 0}\n")
    args = build_parser().parse_args(["compress", "--config", str(tmp_path / "k.yaml"), "--from", "x", "--out", "y"])
    r = build_recipe(args)
    assert r.stage_ratios == (0.1, 0.2, 0.3) and r.target() is None and r.distill_config() is None
    args = build_parser().parse_args(["compress", "--method", "pfec", "--from", "x", "--out", "y",
                                      "--target-params", "0.3"])
    assert type(build_recipe(args)) is K.KESIPFEC


def _closed_form(student: torch.Tensor, teachers: list[torch.Tensor], t: float, mode) -> torch.Tensor:
    q = torch.softmax(student / t, 1)
    ps = [torch.softmax(z / t, 1) for z in teachers]
    if isinstance(mode, MeanKL):
        kls = [(p * (p.log() - q.log())).sum(1).mean() for p in ps]
        return t * t * sum(kls) / len(kls)
    pbar = sum(ps) / len(ps)
    return t * t * (pbar * (pbar.log() - q.log())).sum(1).mean()


@pytest.mark.parametrize("mode", [MeanKL(), MeanProb()])
def test_ensemble_kd_loss_closed_form(mode):
    torch.manual_seed(0)
    teachers = [nn.Linear(6, 5).double() for _ in range(3)]
    student = nn.Linear(6, 5).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    recipe = K.KESI(target_flops=0.5, temperature=5.0, teacher_mode=mode)
    task = K.ensemble_task(recipe, teachers)
    logits, terms = task(student, x, y)
    with torch.no_grad():
        expected = _closed_form(student(x), [t(x) for t in teachers], 5.0, mode)
    assert torch.allclose(terms["kd"], expected, rtol=1e-12, atol=1e-14)
    assert terms["ce"] == 0  # alpha = 1: the code distils with no CE term
    terms["kd"].backward()
    assert student.weight.grad is not None and all(p.grad is None for t in teachers for p in t.parameters())
    mixed = K.ensemble_task(K.KESI(target_flops=0.5, alpha=0.25, teacher_mode=mode), teachers)
    _, t2 = mixed(student, x, y)
    assert torch.allclose(t2["ce"], 0.75 * F.cross_entropy(logits, y))
    assert torch.allclose(t2["kd"], 0.25 * expected, rtol=1e-12)


def test_snapshot_ensemble_prediction_is_mean_probability():
    torch.manual_seed(0)
    teachers = [nn.Linear(4, 3) for _ in range(2)]
    x = torch.randn(5, 4)
    ens = K.SnapshotEnsemble(kp.distill.EnsembleTeacher(teachers))
    expected = (torch.softmax(teachers[0](x), 1) + torch.softmax(teachers[1](x), 1)) / 2
    assert torch.allclose(ens(x).exp(), expected, atol=1e-6)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_chans=1)


RUN = K.KESI(target_flops=0.5, rounds=2, finetune=FT, distill=DT, temperature=4.0)


def test_snapshots_survive_save_load_and_restart(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    model, x = _resnet(), torch.randn(3, 1, 8, 8)
    ctx = CompressContext(copy.deepcopy(model).eval(), train, val, torch.zeros(1, 1, 8, 8), tmp_path, False, False)
    snaps, infos = K.run_rounds(RUN, copy.deepcopy(model), ctx)
    assert [i["prune"]["goal"] for i in infos] == pytest.approx([math.sqrt(0.5), 0.5])
    widths = [sum(p.numel() for p in s.parameters()) for s in snaps]
    assert widths[0] > widths[1]  # snapshots of different widths
    for r, s in enumerate(snaps, start=1):
        loaded = kp.load_pruned(tmp_path / f"round{r}" / "model")
        assert torch.equal(loaded(x), s.eval()(x))
        assert infos[r - 1]["snapshot_top1"] == infos[r - 1]["retrain"][-1]["val_top1"]  # last epoch
    monkeypatch.setattr(K, "train", lambda *a, **k: pytest.fail("finished rounds must not retrain"))
    again, infos2 = K.run_rounds(RUN, copy.deepcopy(model), CompressContext(
        ctx.dense, train, val, ctx.example_input, tmp_path, True, False))
    assert infos2 == infos
    assert all(torch.equal(a.eval()(x), b(x)) for a, b in zip(again, snaps))


def TinyNet32() -> TinyNet:
    """Factory for save/load of the test model (outside the zoo)."""
    return TinyNet(width=32)


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "time" not in k and "per_s" not in k} for row in history]


@pytest.mark.parametrize("make,factory,kill_at", [(_resnet, None, 3), (TinyNet32, TinyNet32, 5)])
def test_resume_after_kill_equals_uninterrupted(make, factory, kill_at, toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    torch.manual_seed(0)
    kw = dict(latency=False, progress=False, factory=factory)
    ref = kp.compress(make(), RUN, train, val, out_dir=tmp_path / "ref", **kw)
    real_write, calls = train_loop._write_epoch, []

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        calls.append(1)
        if len(calls) == kill_at:  # 3: round 2 mid-retrain; 5: mid-distillation
            raise KeyboardInterrupt("killed after epoch checkpoint")

    monkeypatch.setattr(train_loop, "_write_epoch", write_then_die)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        kp.compress(make(), RUN, train, val, out_dir=tmp_path / "run", **kw)
    resumed: list[int] = []

    def count(*args, **kwargs):
        real_write(*args, **kwargs)
        resumed.append(1)

    monkeypatch.setattr(train_loop, "_write_epoch", count)
    torch.manual_seed(0)
    res = kp.compress(make(), RUN, train, val, out_dir=tmp_path / "run", resume=True, **kw)
    assert len(resumed) == 2 * 2 + 2 - kill_at  # only the epochs left after the kill were trained
    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), k
    m_ref, m_res = ref.report["method"], res.report["method"]
    assert m_res["ensemble"] == m_ref["ensemble"] and m_ref["ensemble"]["members"] == ["base", "round1", "round2"]
    assert _untimed(m_res["distill"]) == _untimed(m_ref["distill"])
    assert _untimed(m_res["rounds"][1]["retrain"]) == _untimed(m_ref["rounds"][1]["retrain"])
    kept = ref.report["after"]["flops"] / ref.report["before"]["flops"]
    assert abs(kept - 0.5) <= 0.01
