import pytest
import torch

from dtg.config import SemiConfig, SolverConfig
from dtg.engine.solver import build_optimizer, build_scheduler, lr_factor, unsup_weight


def test_warmup_then_steps():
    cfg = SolverConfig(lr=0.1, warmup_iters=10, warmup_factor=0.001, steps=[20, 30], gamma=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, cfg) == 1.0 and lr_factor(19, cfg) == 1.0
    assert lr_factor(20, cfg) == pytest.approx(0.1) and lr_factor(30, cfg) == pytest.approx(0.01)


def test_scheduler_follows_lr_factor():
    cfg = SolverConfig(lr=0.1, warmup_iters=4, steps=[6], gamma=0.5)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(i, cfg) for i in range(8)])


def test_unsup_weight_burn_in_ramp_and_plateau():
    semi = SemiConfig(alpha=4.0, burn_in=10, alpha_warmup=4)
    assert [unsup_weight(i, semi) for i in (0, 9)] == [0.0, 0.0]
    assert [unsup_weight(i, semi) for i in (10, 11, 12, 13, 14, 100)] == pytest.approx([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    assert unsup_weight(0, SemiConfig(alpha=2.0, burn_in=0, alpha_warmup=0)) == 2.0
