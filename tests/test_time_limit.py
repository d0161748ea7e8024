"""training.optim.TimeLimit: a training loop's steps cut to what fits its max_minutes."""

import pytest

from training.optim import TimeLimit


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(limit: TimeLimit, clock: Clock, seconds_per_unit: float, first: float = 5.0) -> int:
    """Steps a loop does under ``limit`` when each step costs its cost x ``seconds_per_unit`` (the first
    one ``first`` seconds more: warm-up, which the pace leaves out)."""
    step = 0
    while step < limit.total:
        clock.now += limit.costs[step] * seconds_per_unit + (first if step == 0 else 0.0)
        limit.step_done(step)
        step += 1
    return step


def test_a_plan_that_fits_is_kept():
    clock = Clock()
    limit = TimeLimit([1] * 200, 60 * 4, "lm", clock=clock)
    assert run(limit, clock, 1.0) == 200 and not limit.cut and clock.now <= 240


@pytest.mark.parametrize("pace", [1.5, 2.0, 3.7])
def test_a_slow_machine_is_cut_to_fit(pace):
    clock = Clock()
    limit = TimeLimit([1] * 200, 60 * 4, "lm", clock=clock)
    steps = run(limit, clock, pace)
    assert limit.cut and steps == limit.total < 200
    assert 240 - pace <= clock.now <= 240  # as many steps as fit, no more
    assert limit.steps() == steps  # what the learning-rate schedule decays over


def test_costs_weigh_the_steps():
    """Batches of different shapes: the cut keeps the steps whose summed cost fits, in plan order."""
    clock = Clock()
    costs = [1, 4] * 100  # 500 units
    limit = TimeLimit(costs, 300, "classifier", clock=clock)
    run(limit, clock, 1.0, first=0.0)
    assert limit.cut and sum(costs[: limit.total]) <= 300 < sum(costs[: limit.total + 1])


def test_no_limit_and_short_plans_are_never_cut():
    clock = Clock()
    assert run(TimeLimit([1] * 50, 0, "lm", clock=clock), clock, 100.0) == 50
    assert run(TimeLimit([1] * 5, 1, "lm", clock=clock), clock, 100.0) == 5  # no room to measure a pace


def test_the_schedule_decays_over_the_cut_plan():
    import torch

    from training.optim import warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    total = [100]
    schedule = warmup_cosine(opt, 10, lambda: total[0])
    for _ in range(20):
        opt.step()
        schedule.step()
    total[0] = 40  # cut at step 20: the rate reaches its floor (10%) at step 40, not 100
    for _ in range(20):
        opt.step()
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.1)
