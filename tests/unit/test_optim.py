"""AdamW/LAMB parameter groups, a hand-computed LAMB step, LR schedules, layer-wise LR decay."""

import math

import pytest
import torch

from dtrain.config import OptimConfig, ScheduleConfig
from dtrain.errors import DtrainError
from dtrain.model.bert import pretraining_model
from dtrain.optim import Lamb, build_optimizer, build_scheduler, layer_id, lr_multiplier, parameter_groups


def test_lamb_step_matches_a_hand_computed_one():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    p.grad = torch.tensor([1.0, 2.0])
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    opt.step()
    # step 1: bias-corrected m̂ = g, v̂ = g², so update = g/(|g|+eps) + wd·w = [1.03, 1.04] (to 1e-6)
    # trust = 5 / ||[1.03, 1.04]|| = 5 / 1.463693 = 3.416013;  w ← w − 0.1 · 3.416013 · update
    assert p.detach().tolist() == pytest.approx([3 - 0.1 * 3.416013 * 1.03, 4 - 0.1 * 3.416013 * 1.04], abs=1e-5)
    assert p.detach().tolist() == pytest.approx([2.648150, 3.644734], abs=1e-5)


def test_lamb_without_adaptation_is_a_plain_adam_step():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([1.0, 2.0])
    Lamb([{"params": [p], "adapt": False, "weight_decay": 0.0}], lr=0.1).step()
    assert p.detach().tolist() == pytest.approx([2.9, 3.9], abs=1e-5)  # trust 1: w − lr · g/|g|


def test_lamb_second_step_uses_bias_corrected_moments():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 2.0]))
    opt = Lamb([p], lr=0.01, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.0)
    w = p.detach().clone()
    m = torch.zeros(3)
    v = torch.zeros(3)
    for t, g in enumerate([torch.tensor([0.5, 1.0, -1.0]), torch.tensor([-0.2, 0.4, 0.3])], 1):
        p.grad = g
        opt.step()
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g * g
        update = (m / (1 - 0.8 ** t)) / ((v / (1 - 0.9 ** t)).sqrt() + 1e-8)
        w = w - 0.01 * (w.norm() / update.norm()) * update
    assert torch.allclose(p.detach(), w, atol=1e-6)


def test_parameter_groups_exclude_bias_and_layernorm_and_count_tied_weights_once():
    model, _ = pretraining_model("tiny")
    groups = parameter_groups(model, OptimConfig(weight_decay=0.01))
    decay = [n for g in groups if g["weight_decay"] > 0 for n in g["names"]]
    plain = [n for g in groups if g["weight_decay"] == 0 for n in g["names"]]
    assert all(n.endswith(".weight") and "LayerNorm" not in n for n in decay)
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in plain)
    assert all(not g["adapt"] for g in groups if g["weight_decay"] == 0)
    names = [n for g in groups for n in g["names"]]
    assert "cls.predictions.decoder.weight" not in names  # tied to the word embeddings, which are in
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_layerwise_lr_decay_scales_from_the_top_down():
    model, _ = pretraining_model("tiny")  # 2 layers
    opt = build_optimizer(model, OptimConfig(lr=1.0, layerwise_lr_decay=0.5))
    lr_of = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lr_of["bert.embeddings.word_embeddings.weight"] == 0.125
    assert lr_of["bert.encoder.layer.0.attention.self.query.weight"] == 0.25
    assert lr_of["bert.encoder.layer.1.output.dense.weight"] == 0.5
    assert lr_of["cls.predictions.transform.dense.weight"] == 1.0
    assert layer_id("bert.encoder.layer.11.output.dense.weight", 12) == 12


def test_adamw_and_lamb_reduce_a_loss():
    for name, lr in (("adamw", 1e-2), ("lamb", 5e-2)):  # LAMB's steps are relative to ||w||
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = build_optimizer(model, OptimConfig(name=name, lr=lr))
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        first = None
        for _ in range(100):
            loss = torch.nn.functional.mse_loss(model(x), y)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, name


@pytest.mark.parametrize("decay, at_half", [("linear", 0.5), ("poly", math.sqrt(0.5)), ("cosine", 0.5),
                                            ("constant", 1.0)])
def test_schedules(decay, at_half):
    cfg = ScheduleConfig(warmup=10, decay=decay)
    assert [lr_multiplier(s, cfg, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_multiplier(60, cfg, 110) == pytest.approx(at_half)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(1.0 if decay == "constant" else 0.0, abs=1e-9)
    frac = ScheduleConfig(warmup=0.1, decay=decay)
    assert lr_multiplier(9, frac, 100) == pytest.approx(1.0)  # 10% of 100 steps


def test_scheduler_drives_every_group_and_round_trips_its_state():
    model, _ = pretraining_model("tiny")
    opt = build_optimizer(model, OptimConfig(lr=1.0, layerwise_lr_decay=0.5))
    sched = build_scheduler(opt, ScheduleConfig(warmup=2, decay="linear"), 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * g["lr_scale"] for g in opt.param_groups])
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    again = build_scheduler(build_optimizer(model, OptimConfig(lr=1.0, layerwise_lr_decay=0.5)),
                            ScheduleConfig(warmup=2, decay="linear"), 10)
    again.load_state_dict(state)
    assert again.last_epoch == 3
    with pytest.raises(DtrainError, match="the schedule has 0 steps"):
        build_scheduler(opt, ScheduleConfig(), 0)
