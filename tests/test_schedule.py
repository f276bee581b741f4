"""The switch schedule (SPEC section 4)."""

from __future__ import annotations

import pytest

from srlora import SRLoRAConfig, SwitchSchedule


def build(r: int, r_prime: int, r_target: int, total_steps: int | None, switch_interval: int | None):
    budget = SRLoRAConfig(r_target=r_target, gamma=r_prime / r, switch_interval=1).budget(r)
    return SwitchSchedule.build(budget, total_steps, switch_interval)


@pytest.mark.parametrize(
    "n_all,r,r_target,r_prime,expected",
    [
        # N_switch = 12 / 2 = 6, t = 120 // 6 = 20; 120 is the last step: no switch there.
        (120, 4, 16, 2, [20, 40, 60, 80, 100]),
        # N_switch = 6, t = 125 // 6 = 20: the 6th switch at 120 < 125 happens.
        (125, 4, 16, 2, [20, 40, 60, 80, 100, 120]),
        # Paper SST-2-like: r=8, r'=4, r_target=512 -> N_switch = 126; N_all = 1000 -> t = 7.
        (1000, 8, 512, 4, list(range(7, 7 * 126 + 1, 7))),
        # gamma = 1: r' = r = 8, r_target = 32 -> N_switch = 3, t = 33.
        (100, 8, 32, 8, [33, 66, 99]),
        # Non-divisible remainder: N_switch = floor(13 / 4) = 3.
        (90, 8, 21, 4, [30, 60]),
        # r_target = 16 on RTE-like r = 8, r' = 4: N_switch = 2, t = 500.
        (1000, 8, 16, 4, [500]),
    ],
)
def test_paper_schedule(n_all, r, r_target, r_prime, expected):
    sched = build(r, r_prime, r_target, total_steps=n_all, switch_interval=None)
    assert sched.steps() == expected
    assert [t for t in range(1, n_all + 1) if sched.is_switch_step(t)] == expected


def test_fixed_interval_without_total():
    sched = build(4, 2, 16, total_steps=None, switch_interval=25)
    # N_switch = 6 bounds the number of switches even without N_all.
    assert sched.steps() == [25, 50, 75, 100, 125, 150]
    assert not sched.is_switch_step(175)


def test_fixed_interval_with_total_stops_before_last_step():
    sched = build(4, 2, 64, total_steps=100, switch_interval=25)
    assert sched.steps() == [25, 50, 75]


def test_r_target_not_above_r():
    with pytest.raises(ValueError, match="must be larger than the LoRA rank"):
        build(8, 4, 8, total_steps=100, switch_interval=None)


def test_r_target_leaving_no_switch():
    with pytest.raises(ValueError, match=r"room for no switch.*r_target >= 12"):
        build(8, 4, 10, total_steps=100, switch_interval=None)


def test_budget_is_clamped_to_a_narrow_layer():
    config = SRLoRAConfig(r_target=64, gamma=0.5, total_steps=100)
    wide, narrow, no_room = config.budget(8, 384), config.budget(8, 48), config.budget(8, 10)
    assert (wide.directions, wide.num_switches, wide.clamped) == (64, 14, False)
    assert (narrow.directions, narrow.num_switches, narrow.clamped) == (48, 10, True)
    assert (no_room.directions, no_room.num_switches) == (10, 0)
    # The schedule of the narrow layer spreads its 10 switches over the run: every 10 steps.
    assert SwitchSchedule.build(narrow, 100, None).steps() == list(range(10, 100, 10))
    assert SwitchSchedule.build(no_room, 100, None).steps() == []
    with pytest.raises(ValueError, match="exceeds min"):
        config.budget(16, 8)


def test_too_few_steps_for_the_switches():
    with pytest.raises(ValueError, match="shorter than the N_switch=126"):
        build(8, 4, 512, total_steps=100, switch_interval=None)


def test_adaptive_trigger_waits_for_a_stable_ranking():
    import torch

    from srlora.schedule import AdaptiveTrigger

    trig = AdaptiveTrigger(patience=5, min_interval=8, max_interval=40)
    stable = torch.tensor([3.0, 1.0, 2.0, 0.5])  # bottom-2 = {1, 3}
    fired = [trig.update(stable, 2) for _ in range(12)]
    # Stable from the 2nd step on, so patience is met at step 6, but min_interval holds it to 8.
    assert fired.index(True) == 7
    trig.switched()
    # A ranking that keeps changing: only max_interval fires.
    a, b = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0, 0.0])
    fired = [trig.update(a if i % 2 else b, 2) for i in range(40)]
    assert fired.index(True) == 39
    # State round trip.
    again = AdaptiveTrigger(patience=5, min_interval=8, max_interval=40)
    again.load_state_dict(trig.state_dict())
    assert again.state_dict()["since_switch"] == trig.since_switch == 40
