"""The EMA of the weights and the LR warm-up against their closed forms (no Trainer).

EMA (src.lit.ema): with d_n = min(decay, (1 + n) / (10 + n)) the decay of update n (0-based),
    e_{n+1} = d_n e_n + (1 - d_n) p_{n+1},
so for a parameter held at a constant p: e_k = p + (e_0 - p) * prod_{n<k} d_n.
Warm-up (src.lit.optim): the optimizer step k (0-based) runs with lr * min(1, (k + 1) / warmup), times
(1 + cos(pi * clip((k + 1 - warmup) / (total - warmup + 1), 0, 1))) / 2 under the cosine schedule.
"""

import io
import math

import pytest
import torch
from torch import nn

from src.lit.ema import EMA
from src.lit.optim import make_optimizer, with_linear_warmup


class Scalars(nn.Module):
    """Two float64 parameters, a scalar and a vector, so the EMA can be followed by hand."""

    def __init__(self, a: float = 0.0, b: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def set(self, a: float, b: tuple[float, float]) -> None:
        with torch.no_grad():
            self.a.fill_(a)
            self.b.copy_(torch.tensor(b, dtype=torch.float64))


def updated(ema: EMA, net: nn.Module, times: int) -> EMA:
    for _ in range(times):
        ema.update(net)
    return ema


def assert_ema(ema: EMA, a: float, b: tuple[float, float]) -> None:
    torch.testing.assert_close(ema.model.a, torch.tensor(a, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ema.model.b, torch.tensor(b, dtype=torch.float64), rtol=0, atol=1e-12)


# --- EMA: decay warm-up --------------------------------------------------------------------------
@pytest.mark.parametrize("n, expected", [(0, 1 / 10), (1, 2 / 11), (2, 3 / 12), (100, 101 / 110)])
def test_decay_warms_up_as_one_plus_n_over_ten_plus_n(n, expected):
    ema = updated(EMA(Scalars(), decay=0.9999), Scalars(), n)
    assert ema.num_updates == n
    assert ema.current_decay() == pytest.approx(expected, rel=1e-15)


def test_decay_after_the_warm_up_is_the_decay():
    # (1 + n) / (10 + n) >= 0.9 from n = 80 on; 0.9999 is reached at n = 89991
    ema = updated(EMA(Scalars(), decay=0.9), Scalars(), 200)
    assert ema.current_decay() == 0.9
    ema = EMA(Scalars(), decay=0.9999)
    ema.load_state_dict({**ema.state_dict(), "_extra_state": {"num_updates": 10**6}})
    assert ema.current_decay() == 0.9999


@pytest.mark.parametrize("n", [0, 1, 5])
def test_without_warmup_the_decay_is_constant(n):
    ema = updated(EMA(Scalars(), decay=0.75, warmup=False), Scalars(), n)
    assert ema.current_decay() == 0.75


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_decay_outside_zero_one_is_an_error(decay):
    with pytest.raises(ValueError, match=r"ema decay must be in \[0, 1\]"):
        EMA(Scalars(), decay=decay)


# --- EMA: the averaged parameters ----------------------------------------------------------------
def test_constant_parameters_follow_the_warm_up_product():
    net = Scalars(2.0, (1.0, -3.0))
    ema = EMA(net, decay=0.9999)  # e_0 = the initial weights
    net.set(5.0, (0.0, 1.0))
    # d_0 d_1 d_2 = 1/10 * 2/11 * 3/12 = 1/220
    updated(ema, net, 3)
    assert_ema(ema, 5.0 + (2.0 - 5.0) / 220, (0.0 + (1.0 - 0.0) / 220, 1.0 + (-3.0 - 1.0) / 220))
    # and without warm-up, d = 0.5 four times: prod = 1/16
    ema = updated(EMA(Scalars(2.0, (1.0, -3.0)), decay=0.5, warmup=False), net, 4)
    assert_ema(ema, 5.0 - 3.0 / 16, (1.0 / 16, 1.0 - 4.0 / 16))


def test_a_known_parameter_sequence_gives_the_recursion_by_hand():
    net = Scalars(0.0, (0.0, 0.0))
    ema = EMA(net, decay=0.5, warmup=False)
    sequence = [(4.0, (2.0, -2.0)), (8.0, (0.0, 6.0)), (-4.0, (10.0, 2.0))]
    for a, b in sequence:
        net.set(a, b)
        ema.update(net)
    # e_3 = 1/8 e_0 + 1/8 p_1 + 1/4 p_2 + 1/2 p_3
    assert_ema(ema, 4 / 8 + 8 / 4 - 4 / 2, (2 / 8 + 0 / 4 + 10 / 2, -2 / 8 + 6 / 4 + 2 / 2))
    # with warm-up the decays are 1/10, 2/11, 3/12: e_1 = 0.9 p_1, e_2 = 2/11 e_1 + 9/11 p_2, e_3 = 1/4 e_2 + 3/4 p_3
    net = Scalars(0.0, (0.0, 0.0))
    ema = EMA(net, decay=0.9999)
    for a, b in sequence:
        net.set(a, b)
        ema.update(net)
    e1 = 0.9 * 4.0
    e2 = 2 / 11 * e1 + 9 / 11 * 8.0
    assert ema.model.a.item() == pytest.approx(1 / 4 * e2 + 3 / 4 * -4.0, abs=1e-12)


def test_decay_one_keeps_the_initial_weights_and_zero_copies_the_live_ones():
    net = Scalars(1.0, (2.0, 3.0))
    frozen, copied = EMA(net, decay=1.0, warmup=False), EMA(net, decay=0.0, warmup=False)
    net.set(-1.0, (7.0, 9.0))
    updated(frozen, net, 2)
    updated(copied, net, 2)
    assert_ema(frozen, 1.0, (2.0, 3.0))
    assert_ema(copied, -1.0, (7.0, 9.0))


def test_buffers_are_copied_and_only_parameters_averaged():
    net = nn.BatchNorm1d(2)
    ema = EMA(net, decay=0.9999)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([3.0, -1.0]))  # initial weight 1, bias 0
        net.bias.copy_(torch.tensor([2.0, 4.0]))
        net.running_mean.copy_(torch.tensor([5.0, -7.0]))  # initial 0
        net.running_var.copy_(torch.tensor([0.5, 2.0]))  # initial 1
        net.num_batches_tracked.fill_(12)
    ema.update(net)  # d_0 = 0.1: e_1 = 0.1 e_0 + 0.9 p
    torch.testing.assert_close(ema.model.weight, torch.tensor([0.1 + 0.9 * 3.0, 0.1 - 0.9 * 1.0]))
    torch.testing.assert_close(ema.model.bias, torch.tensor([0.9 * 2.0, 0.9 * 4.0]))
    assert torch.equal(ema.model.running_mean, torch.tensor([5.0, -7.0]))
    assert torch.equal(ema.model.running_var, torch.tensor([0.5, 2.0]))
    assert ema.model.num_batches_tracked.item() == 12


def test_the_copy_is_independent_of_the_live_net():
    net = Scalars(1.0, (1.0, 1.0))
    ema = EMA(net)
    net.set(6.0, (6.0, 6.0))  # no update: the average does not move
    assert_ema(ema, 1.0, (1.0, 1.0))


# --- EMA: grad and mode --------------------------------------------------------------------------
def test_the_copy_never_requires_grad_and_stays_in_eval_mode():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train()
    ema = EMA(net)
    parent = nn.Module()
    parent.ema = ema
    assert all(p.requires_grad for p in net.parameters())  # the live net is untouched
    assert net.training
    for _ in range(2):
        parent.train()
        ema.train(True)
        ema.update(net)
        assert ema.training and not ema.model.training
        assert not any(m.training for m in ema.model.modules())
        assert not any(p.requires_grad for p in ema.parameters())
    parent.eval()
    assert not ema.model.training
    # in eval mode the copy is deterministic: dropout off, BatchNorm on its running statistics
    x = torch.randn(4, 2)
    assert torch.equal(ema.model(x), ema.model(x))


# --- EMA: resume ---------------------------------------------------------------------------------
def test_update_count_survives_a_state_dict_round_trip_and_resume_continues_the_warm_up():
    net = Scalars(0.0, (0.0, 0.0))
    ema = EMA(net, decay=0.9999)
    net.set(1.0, (2.0, 4.0))
    updated(ema, net, 3)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)  # as a checkpoint stores it
    buffer.seek(0)
    resumed = EMA(Scalars(9.0, (9.0, 9.0)), decay=0.9999)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.num_updates == 3 and not any(p.requires_grad for p in resumed.parameters())
    assert resumed.current_decay() == pytest.approx(4 / 13, rel=1e-15)  # not the 1/10 of a fresh start
    assert_ema(resumed, 1.0 - 1.0 / 220, (2.0 - 2.0 / 220, 4.0 - 4.0 / 220))
    # one more step: prod = 1/220 * 4/13
    resumed.update(net)
    assert_ema(resumed, 1.0 - 4 / 2860, (2.0 - 8 / 2860, 4.0 - 16 / 2860))


def test_update_count_travels_in_the_parent_modules_state_dict():
    parent, fresh = nn.Module(), nn.Module()
    parent.ema, fresh.ema = EMA(Scalars()), EMA(Scalars())
    updated(parent.ema, Scalars(), 5)
    fresh.load_state_dict(parent.state_dict())
    assert fresh.ema.num_updates == 5


# --- LR warm-up ----------------------------------------------------------------------------------
def lrs_seen_by_steps(optimizer: torch.optim.Optimizer, schedule: dict, steps: int) -> list[float]:
    """The LR each optimizer step runs with, stepping the scheduler after each step as Lightning does
    for interval "step"."""
    assert schedule["optimizer"] is optimizer and schedule["lr_scheduler"]["interval"] == "step"
    scheduler = schedule["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_ramps_the_lr_linearly_then_holds_it():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(3))], lr=1e-3)
    seen = lrs_seen_by_steps(optimizer, with_linear_warmup(optimizer, 4), 6)
    # lr * min(1, (step + 1) / 4) for steps 0..5
    assert seen == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_the_warmed_up_lr_is_the_one_the_update_uses():
    # SGD with a gradient of 1 moves the weight by exactly the LR of each step
    weight = nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    lrs_seen_by_steps(optimizer, with_linear_warmup(optimizer, 5), 7)
    expected = -0.1 * (1 / 5 + 2 / 5 + 3 / 5 + 4 / 5 + 1 + 1 + 1)
    assert weight.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_no_warmup_means_the_full_lr_from_the_first_step(warmup_steps):
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(3))], lr=2e-4)
    seen = lrs_seen_by_steps(optimizer, with_linear_warmup(optimizer, warmup_steps), 3)
    assert seen == [2e-4, 2e-4, 2e-4]


def test_warmup_scales_every_parameter_group_by_its_own_lr():
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}, {"params": [nn.Parameter(torch.zeros(1))]}]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    with_linear_warmup(optimizer, 2)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]  # step 0: half of each


def test_cosine_schedule_follows_its_closed_form_after_the_warmup():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    seen = lrs_seen_by_steps(optimizer, with_linear_warmup(optimizer, 3, "cosine", total_steps=10), 10)
    expected = [
        0.4 * min(1, (s + 1) / 3) * (1 + math.cos(math.pi * min(1, max(0, s + 1 - 3) / 8))) / 2 for s in range(10)
    ]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[2] == pytest.approx(0.4) and seen[:3] == pytest.approx([0.4 / 3, 0.8 / 3, 0.4])
    assert all(a > b > 0 for a, b in zip(seen[2:], seen[3:]))  # falls every step, never reaches 0


def test_a_cosine_run_no_longer_than_its_warmup_only_ramps():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    seen = lrs_seen_by_steps(optimizer, with_linear_warmup(optimizer, 4, "cosine", total_steps=3), 3)
    assert seen == pytest.approx([0.1, 0.2, 0.3], rel=1e-12)


@pytest.mark.parametrize(
    "schedule, total, match",
    [("cosine", None, "trainer.max_steps"), ("cosine", -1, "trainer.max_steps"), ("linear", 10, "unknown lr_schedule")],
)
def test_bad_lr_schedules_are_refused(schedule, total, match):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        with_linear_warmup(optimizer, 3, schedule, total_steps=total)


# --- make_optimizer -----------------------------------------------------------------------------
@pytest.mark.parametrize("implementation, foreach", [("foreach", True), ("for-loop", False)])
def test_implementation_sets_the_optimizers_kernel_flag(implementation, foreach):
    optimizer = make_optimizer(
        [nn.Parameter(torch.zeros(2))], "torch.optim.AdamW", implementation=implementation, lr=3e-4, weight_decay=0.0
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["foreach"] is foreach
    assert not optimizer.defaults.get("fused")
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["weight_decay"] == 0.0


@pytest.mark.parametrize("implementation", ["fast", "Fused", "", None])
def test_unknown_implementation_raises_value_error(implementation):
    with pytest.raises(ValueError, match="unknown optimizer implementation.*choose auto, fused, foreach or for-loop"):
        make_optimizer([nn.Parameter(torch.zeros(2))], implementation=implementation, lr=1e-3)
